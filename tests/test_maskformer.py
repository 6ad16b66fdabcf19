"""SeMask-MaskFormer: config rules and checks, training, save / load, Auto classes, remote code and pipeline,
conversion refusals and fine-tuning through the training script."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from test_mask2former_auto import pipeline_segments, run_remote_script, write_remote_inputs
from transformers import AutoConfig, AutoModel, AutoModelForInstanceSegmentation, AutoModelForSemanticSegmentation

from conftest import fpn_fixture_dir, load_script, mask2former_fixture_dir, tiny_maskformer_config_kwargs, train_steps
from semask import (
    SemaskImageProcessor,
    SemaskMask2FormerConfig,
    SemaskMaskFormerConfig,
    SemaskMaskFormerForInstanceSegmentation,
    SemaskMaskFormerModel,
)
from semask.conversion import main
from semask.modelcard import ORIGINAL_RESULTS, count_parameters, preset_mismatches, write_model_card
from semask.presets import mask2former_semantic_attention, maskformer_semantic_attention
from semask.training import ModelArguments, initialise_model, resolve_model_type

FIXTURE = Path(__file__).parent / "fixtures" / "original_semask_maskformer" / "tiny"
MASKFORMER = "semask_maskformer"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny SeMask-MaskFormer with its processor, a test image, an input and its mask predictions."""
    torch.manual_seed(0)
    model = SemaskMaskFormerForInstanceSegmentation(SemaskMaskFormerConfig(**tiny_maskformer_config_kwargs())).eval()
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, do_reduce_labels=False)
    folder = tmp_path_factory.mktemp("saved") / "semask-maskformer-tiny"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder, write_remote_inputs(model, folder)


def test_original_semantic_attention_rules_of_each_codebase():
    windowed, global_ = "windowed", "global"
    assert maskformer_semantic_attention() == (windowed, windowed, windowed, global_)
    for num_labels in (19, 150):  # SeMask-FaPN and SeMask-MaskFormer ignore the class count
        assert mask2former_semantic_attention(num_labels, 4, "fapn") == (windowed, windowed, global_, global_)
        assert mask2former_semantic_attention(num_labels, 4, "msfapn") == (windowed, windowed, global_, global_)
    assert mask2former_semantic_attention(150) == (windowed, windowed, windowed, global_)
    config = SemaskMaskFormerConfig(id2label={index: str(index) for index in range(19)})
    assert config.backbone_config.semantic_attention == (windowed, windowed, windowed, global_)
    fapn = SemaskMask2FormerConfig(pixel_decoder="fapn", id2label={0: "a", 1: "b"})
    assert fapn.backbone_config.semantic_attention == (windowed, windowed, global_, global_)


def test_preset_matches_the_released_model():
    name = "semask-large-maskformer-ade20k"
    config = SemaskMaskFormerConfig.from_preset(name)
    assert config.num_labels == 150 and config.backbone_config.embed_dim == 192
    assert config.backbone_config.semantic_window_size == 12 and config.use_auxiliary_loss
    detr = config.decoder_config
    assert (detr.d_model, detr.num_queries, detr.decoder_layers, detr.decoder_ffn_dim) == (256, 100, 6, 2048)
    assert (config.mask_weight, config.dice_weight, config.semantic_loss_weight) == (20.0, 1.0, 0.4)
    assert abs(count_parameters(config) / 1e6 - int(ORIGINAL_RESULTS[name].params[:-1])) < 1
    assert preset_mismatches(config, name) == []
    mask2former = SemaskMask2FormerConfig.from_preset("semask-large-mask2former-ade20k")
    assert preset_mismatches(mask2former, name) == ["model kind (SeMask-Mask2Former, not SeMask-MaskFormer)"]


def test_mask_classification_presets_have_the_released_parameter_counts():
    """Within 1M of the original README's counts (which it rounds or truncates)."""
    for name in ("ade20k", "fapn-ade20k", "msfapn-ade20k"):
        preset = f"semask-large-mask2former-{name}"
        reported = int(ORIGINAL_RESULTS[preset].params[:-1])
        assert abs(count_parameters(SemaskMask2FormerConfig.from_preset(preset)) / 1e6 - reported) < 1, preset


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fpn_feature_size": 48}, "multiple of 32"),
        ({"size_divisibility": 30}, "multiple of the patch size"),
        ({"id2label": {0: "a", 2: "b"}}, "id2label"),
    ],
)
def test_config_refuses_settings_that_cannot_work(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        SemaskMaskFormerConfig(**tiny_maskformer_config_kwargs(**overrides))


def test_loss_goes_down_and_every_term_is_reported():
    torch.manual_seed(0)
    model = SemaskMaskFormerForInstanceSegmentation(SemaskMaskFormerConfig(**tiny_maskformer_config_kwargs()))
    pixel_values = torch.randn(2, 3, 61, 75)
    labels = torch.randint(0, 5, (2, 61, 75))
    labels[:, :, :8] = 255
    model.train()
    outputs = model(pixel_values, labels=labels, output_auxiliary_logits=True)
    assert outputs.masks_queries_logits.shape == (2, 6, 16, 24)  # the input padded to 64 x 96, at stride 4
    assert len(outputs.auxiliary_logits) == 2 and outputs.semantic_logits.shape == (2, 5, 64, 96)
    terms = model.loss_terms(
        outputs.masks_queries_logits,
        outputs.class_queries_logits,
        outputs.auxiliary_logits,
        outputs.semantic_logits,
        labels=labels,
    )
    assert set(terms) == {
        f"{name}{suffix}" for name in ("loss_cross_entropy", "loss_mask", "loss_dice") for suffix in ("", "_0", "_1")
    } | {"loss_semantic"}
    torch.testing.assert_close(sum(terms.values()), outputs.loss)
    losses = train_steps(model, pixel_values, labels, steps=8)
    assert losses[-1] < 0.85 * losses[0], losses


def test_bad_targets_are_refused_early():
    model = SemaskMaskFormerForInstanceSegmentation(SemaskMaskFormerConfig(**tiny_maskformer_config_kwargs()))
    pixel_values = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 5\) or equal the ignore index 255; found \[7\]"):
        model(pixel_values, labels=torch.full((1, 32, 32), 7))
    with pytest.raises(ValueError, match="together"):
        model(pixel_values, mask_labels=[torch.zeros(1, 32, 32)])
    with pytest.raises(TypeError, match="does not use"):
        model(pixel_values, pixel_mask=torch.ones(1, 32, 32))


def test_save_load_round_trip_and_auto_classes(saved):
    model, _, folder, _ = saved
    names = {path.name for path in folder.iterdir()}
    code = {"configuration_semask_maskformer.py", "modeling_semask_maskformer.py", "modeling_semask.py"}
    assert code | {"modeling_semask_mask_classification.py", "config.json", "model.safetensors"} <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForInstanceSegmentation"] == auto_map["AutoModelForSemanticSegmentation"]
    assert type(AutoConfig.from_pretrained(folder)) is SemaskMaskFormerConfig
    assert type(AutoModel.from_pretrained(folder)) is SemaskMaskFormerModel
    pixel_values = torch.randn(1, 3, 64, 64)
    for auto_class in (AutoModelForInstanceSegmentation, AutoModelForSemanticSegmentation):
        reloaded = auto_class.from_pretrained(folder)
        assert type(reloaded) is SemaskMaskFormerForInstanceSegmentation and not reloaded.training
        with torch.no_grad():
            torch.testing.assert_close(
                reloaded(pixel_values).masks_queries_logits, model(pixel_values).masks_queries_logits
            )


@pytest.mark.parametrize("how", ["installed", "remote"])
def test_remote_code_and_pipeline(saved, how, tmp_path):
    model, processor, folder, image = saved
    report = run_remote_script(folder, how, tmp_path, auto_class="AutoModelForInstanceSegmentation")
    assert report["model"].startswith("semask." if how == "installed" else "transformers_modules.")
    assert report["pipeline_model"] == "SemaskMaskFormerForInstanceSegmentation"
    assert report["segments"] == pipeline_segments(model, processor, image)


FAPN_FIXTURES = Path(__file__).parent / "fixtures" / "original_semask_fapn"
KIND_MISMATCHES = [  # (checkpoint, preset of another kind, what the error calls the checkpoint, a key it names)
    ("fapn", "semask-large-maskformer-ade20k", "SeMask-Mask2Former (fapn pixel decoder)", "align_1.dcpack_L2.weight"),
    ("msfapn", "semask-large-maskformer-ade20k", "SeMask-Mask2Former (msfapn pixel decoder)", "align_1.dcpack_L2"),
    ("msfapn", "semask-tiny-fpn-ade20k", "SeMask-Mask2Former (msfapn pixel decoder)", "align_1.dcpack_L2"),
    ("maskformer", "semask-large-mask2former-ade20k", "SeMask-MaskFormer", "transformer.decoder.layers.0.linear1"),
    ("maskformer", "semask-large-mask2former-fapn-ade20k", "SeMask-MaskFormer", "transformer.decoder.layers.0"),
    ("maskformer", "semask-large-fpn-ade20k", "SeMask-MaskFormer", "transformer.decoder.layers.0"),
    ("mask2former", "semask-large-maskformer-ade20k", "SeMask-Mask2Former", "sem_seg_head.predictor."),
    ("fpn", "semask-large-maskformer-ade20k", "SeMask-FPN", "decode_head."),
]


def original_checkpoint(kind: str) -> Path:
    return {
        "fapn": FAPN_FIXTURES / "tiny-fapn",
        "msfapn": FAPN_FIXTURES / "tiny-msfapn",
        "maskformer": FIXTURE,
        "mask2former": mask2former_fixture_dir("tiny-ade"),
        "fpn": fpn_fixture_dir("tiny-windowed"),
    }[kind] / "original_checkpoint.pth"


@pytest.mark.parametrize(("kind", "preset", "name", "key"), KIND_MISMATCHES)
def test_presets_of_another_kind_are_refused_naming_the_telling_keys(kind, preset, name, key, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["--checkpoint", str(original_checkpoint(kind)), "--output", str(output), "--preset", preset]) == 1
    error = capsys.readouterr().err
    assert f"{preset} is a" in error and f"preset but this is a {name} checkpoint (it has " in error
    assert key in error and "use one of" in error
    assert not output.exists() and list(tmp_path.iterdir()) == []  # no output, no staging folder


def test_a_fapn_preset_with_a_plain_mask2former_checkpoint_names_the_pixel_decoder(tmp_path, capsys):
    arguments = ["--checkpoint", str(original_checkpoint("mask2former")), "--output", str(tmp_path / "out")]
    assert main([*arguments, "--preset", "semask-large-mask2former-fapn-ade20k"]) == 1
    assert "pixel_decoder: given fapn, checkpoint msdeformattn" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_model_card_of_the_preset(tmp_path):
    config = SemaskMaskFormerConfig.from_preset("semask-large-maskformer-ade20k")
    card = write_model_card(tmp_path, config, preset="semask-large-maskformer-ade20k").read_text()
    assert "SeMask-MaskFormer: a SeMask Swin-L encoder" in card and "54.75" in card and "56.15" in card
    assert "100 queries, 6 DETR layers of width 256 (8 heads, FFN 2048)" in card
    assert "SeMask-MaskFormer test pipeline (detectron2)" in card


def test_mismatched_maskformer_checkpoint_lists_the_keys(tmp_path, capsys):
    state_dict = torch.load(FIXTURE / "original_checkpoint.pth", weights_only=True)["model"]
    del state_dict["sem_seg_head.pixel_decoder.adapter_2.norm.bias"]
    state_dict["sem_seg_head.predictor.mask_embed.layers.2.bias"] = torch.zeros(7)
    checkpoint = tmp_path / "broken.pth"
    torch.save({"model": state_dict}, checkpoint)
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "model.pixel_level_module.decoder.fpn.layers.1.proj.1.bias" in error  # missing
    assert "mask_embedder.2.0.bias: checkpoint (7,), model (32,)" in error  # mis-shaped
    assert not (tmp_path / "out").exists()
    preset = ["--preset", "semask-large-maskformer-ade20k"]
    assert (
        main(["--checkpoint", str(FIXTURE / "original_checkpoint.pth"), "--output", str(tmp_path / "o"), *preset]) == 1
    )
    error = capsys.readouterr().err
    assert "num_labels: given 150, checkpoint 12" in error and "embed_dim: given 192, checkpoint 32" in error


def test_training_initialisation_of_each_start():
    labels = {0: "a", 1: "b", 2: "c"}
    assert resolve_model_type(ModelArguments(preset="semask-large-maskformer-ade20k")) == MASKFORMER
    model, report = initialise_model(ModelArguments(preset="tiny", model_type=MASKFORMER), labels)
    assert type(model) is SemaskMaskFormerForInstanceSegmentation and model.config.id2label == labels
    assert "random weights" in report.source
    with pytest.raises(ValueError, match="applies to SeMask-Mask2Former"):
        initialise_model(ModelArguments(preset="tiny", model_type=MASKFORMER, pixel_decoder="fapn"), labels)


def test_the_script_fine_tunes_maskformer_with_its_recipe(tmp_path):
    output_dir = tmp_path / "run"
    data = "--dataset_name demo --demo_train_size 16 --demo_validation_size 4 --demo_image_size 64 --image_scale 256 64"
    schedule = "--num_train_epochs 6 --eval_strategy no --logging_steps 2 --per_device_train_batch_size 4"
    script = load_script("train_semask")
    load = ["--model_type", MASKFORMER, "--output_dir", str(output_dir)]
    metrics = script.main(data.split() + schedule.split() + load)
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert np.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_mean_iou"] <= 1
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == MASKFORMER
    released = script.parse_arguments(["--output_dir", str(tmp_path / "x"), "--model_type", MASKFORMER])
    _, _, recipe, training_args = released
    assert (training_args.learning_rate, training_args.weight_decay, training_args.warmup_steps) == (6e-5, 0.01, 1500)
    assert (recipe.backbone_lr_multiplier, recipe.poly_power, training_args.max_grad_norm) == (1.0, 0.9, 0.01)
