"""Fine-tuning SeMask-Mask2Former: model-kind selection, initialisation, its recipe (optimiser groups, encoder
learning rate, padding, defaults), the OHEM refusal, and the training script end to end on the demo data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import assert_only_reinitialised_weights_changed, load_script, make_trainer
from transformers import AutoModelForUniversalSegmentation, SwinConfig, SwinModel

from conftest import tiny_mask2former_config_kwargs
from semask import SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation
from semask.image_processing_semask import SemaskImageProcessor
from semask.inference import semantic_inference
from semask.metrics import SegmentationMetric
from semask.training import (
    EvalTransform,
    ModelArguments,
    RecipeArguments,
    TrainTransform,
    initialise_model,
    no_weight_decay_parameter_names,
    pad_collate,
    preset_config,
    resolve_model_type,
)

MASK2FORMER = "semask_mask2former"
ENCODER = "model.pixel_level_module.encoder."
# Predicting the demo's background everywhere scores about 0.15 mIoU (its IoU, about 0.9, over 6 classes); the test
# run below measured 0.32.
MIN_DEMO_MEAN_IOU = 0.22


@pytest.fixture
def tiny_model() -> SemaskMask2FormerForUniversalSegmentation:
    torch.manual_seed(0)
    return SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))


@pytest.fixture
def tiny_swin_folder(tmp_path):
    swin_config = SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4, mlp_ratio=2.0)
    SwinModel(swin_config).save_pretrained(tmp_path / "swin")
    return tmp_path / "swin"


# --- model kind and initialisation


def test_model_kind_comes_from_the_flag_preset_or_checkpoint(tmp_path, tiny_model, tiny_swin_folder):
    tiny_model.save_pretrained(tmp_path / "m2f")
    resolved = {
        (preset, model_type): resolve_model_type(ModelArguments(preset=preset, model_type=model_type))
        for preset, model_type in [
            ("tiny", None),
            ("tiny", MASK2FORMER),
            ("semask-large-mask2former-ade20k", None),
            ("semask-large-mask2former-cityscapes", MASK2FORMER),
            ("semask-tiny-fpn-ade20k", None),
        ]
    }
    assert list(resolved.values()) == ["semask", MASK2FORMER, MASK2FORMER, MASK2FORMER, "semask"]
    assert resolve_model_type(ModelArguments(model_name_or_path=str(tmp_path / "m2f"))) == MASK2FORMER
    swin = ModelArguments(model_name_or_path=str(tiny_swin_folder))
    assert resolve_model_type(swin) == "semask"
    swin.model_type = MASK2FORMER
    assert resolve_model_type(swin) == MASK2FORMER

    with pytest.raises(ValueError, match="--model_type semask contradicts the checkpoint .*'semask_mask2former'"):
        resolve_model_type(ModelArguments(model_name_or_path=str(tmp_path / "m2f"), model_type="semask"))
    with pytest.raises(ValueError, match="contradicts the preset 'semask-tiny-fpn-ade20k'"):
        resolve_model_type(ModelArguments(preset="semask-tiny-fpn-ade20k", model_type=MASK2FORMER))
    with pytest.raises(ValueError, match="Unknown preset 'semask-huge'; expected one of: tiny, semask-tiny-fpn"):
        resolve_model_type(ModelArguments(preset="semask-huge"))
    expected = "--model_type must be one of semask, semask_mask2former, semask_maskformer, semask_mit; got"
    with pytest.raises(ValueError, match=expected):
        ModelArguments(preset="tiny", model_type="mask2former")


def test_new_label_set_reinitialises_the_class_weights_of_a_checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "source")
    new_labels = {0: "a", 1: "b", 2: "c"}
    arguments = ModelArguments(model_name_or_path=str(tmp_path / "source"), drop_path_rate=0.2)
    model, report = initialise_model(arguments, new_labels)
    semantic_projections = [
        f"{ENCODER}encoder.layers.{stage}.semantic_layer.blocks.0.{projection}.{kind}"
        for stage in range(4)
        for projection in ("q_proj", "k_proj")
        for kind in ("weight", "bias")
    ]
    classifier = ["class_predictor.bias", "class_predictor.weight", "criterion.empty_weight"]
    assert report.reinitialised == sorted(semantic_projections + classifier) and report.unused == []
    assert report.source == f"the SeMask-Mask2Former checkpoint {tmp_path / 'source'}"
    assert isinstance(model, SemaskMask2FormerForUniversalSegmentation)
    assert model.config.id2label == new_labels and model.config.backbone_config.num_labels == 3
    assert model.class_predictor.out_features == 4 and model.config.backbone_config.drop_path_rate == 0.2
    # the no-object class keeps its weight in the rebuilt loss
    assert model.criterion.empty_weight.tolist() == pytest.approx([1, 1, 1, model.config.no_object_weight])
    assert_only_reinitialised_weights_changed(model, tiny_model, report, tmp_path / "source")


def test_presets_tiny_model_and_swin_start(tiny_swin_folder):
    six, ade = {index: str(index) for index in range(6)}, {index: str(index) for index in range(150)}
    labels = lambda id2label: {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}  # noqa: E731
    # the original SeMask-Mask2Former rule for the data's class count: global last stage only with 150 classes
    large = preset_config("semask-large-mask2former-ade20k", MASK2FORMER, labels(six))
    assert large.backbone_config.embed_dim == 192 and large.num_labels == large.backbone_config.num_labels == 6
    assert large.backbone_config.semantic_attention == ("windowed",) * 4
    large = preset_config("semask-large-mask2former-cityscapes", MASK2FORMER, labels(ade))
    assert large.backbone_config.semantic_attention == ("windowed",) * 3 + ("global",)

    model, report = initialise_model(ModelArguments(preset="tiny", model_type=MASK2FORMER, drop_path_rate=0.0), six)
    assert isinstance(model, SemaskMask2FormerForUniversalSegmentation) and model.config.num_labels == 6
    assert model.config.backbone_config.drop_path_rate == 0.0 and report.source.startswith("random weights")

    model, report = initialise_model(
        ModelArguments(model_name_or_path=str(tiny_swin_folder), model_type=MASK2FORMER), ade
    )
    swin_state = SwinModel.from_pretrained(tiny_swin_folder).state_dict()
    encoder_state = model.model.pixel_level_module.encoder.state_dict()
    loaded = [name for name in swin_state if name in encoder_state]
    assert len(loaded) == len(swin_state) - 2  # all but Swin's final LayerNorm, which SeMask does not have
    assert all(torch.equal(encoder_state[name], swin_state[name]) for name in loaded)
    assert report.unused == ["layernorm.bias", "layernorm.weight"]
    encoder = model.config.backbone_config
    assert encoder.embed_dim == 16 and encoder.window_size == encoder.semantic_window_size == 4
    assert model.config.num_labels == encoder.num_labels == 150
    # the Mask2Former rule (the FPN rule would give windowed attention everywhere for embed_dim 16)
    assert encoder.semantic_attention == ("windowed",) * 3 + ("global",)
    assert report.source == f"the Swin checkpoint {tiny_swin_folder}"
    assert {"class_predictor.weight", f"{ENCODER}hidden_states_norms.stage1.weight"} <= set(report.reinitialised)
    assert f"{ENCODER}encoder.layers.0.semantic_layer.blocks.0.q_proj.weight" in report.reinitialised
    assert not [name for name in report.reinitialised if name.startswith(ENCODER) and ".attention." in name]


# --- the recipe


def test_ohem_is_refused(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="OHEM .* applies to SeMask-FPN's per-pixel logits"):
        make_trainer(tmp_path, tiny_model, ohem=True)
    script = load_script("train_semask")
    with pytest.raises(ValueError, match="Train without --ohem"):  # before any data is loaded
        script.parse_arguments(["--dataset_name", "demo", "--model_type", MASK2FORMER, "--output_dir", "x", "--ohem"])


def test_weight_decay_groups_and_encoder_learning_rate(tmp_path, tiny_model):
    excluded = no_weight_decay_parameter_names(tiny_model)
    named = dict(tiny_model.named_parameters())
    norms_and_embeddings = {
        f"{module_name}.{name}"
        for module_name, module in tiny_model.named_modules()
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Embedding))
        for name, _ in module.named_parameters(recurse=False)
    }
    tables = {name for name in named if name.endswith("relative_position_bias_table")}
    assert len(tables) == 8 and excluded == norms_and_embeddings | tables
    assert "model.pixel_level_module.decoder.adapter_1.1.weight" in excluded  # a GroupNorm
    assert "model.transformer_module.queries_features.weight" in excluded  # an nn.Embedding
    # biases and the pixel decoder's level embedding (a plain Parameter) keep their decay, as in the original
    assert {"class_predictor.bias", "model.pixel_level_module.decoder.level_embed"}.isdisjoint(excluded)

    trainer = make_trainer(tmp_path, tiny_model, backbone_lr_multiplier=0.1)  # lr 0.1, weight decay 0.05
    optimizer = trainer.create_optimizer()
    settings = {
        id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    assert len(settings) == len(named)
    for name, parameter in named.items():
        expected = (0.01 if name.startswith(ENCODER) else 0.1, 0.0 if name in excluded else 0.05)
        assert settings[id(parameter)] == pytest.approx(expected), name
    scheduler = trainer.create_scheduler(num_training_steps=100)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    learning_rates = {group["lr"] for group in optimizer.param_groups}
    assert sorted(learning_rates) == pytest.approx([0.1 * 0.7 * 0.1, 0.1 * 0.7])  # poly power 1, warm-up done


def test_crops_are_padded_with_the_pixel_value_before_normalisation():
    processor = SemaskImageProcessor(size={"longest_edge": 40, "shortest_edge": 10}, do_reduce_labels=False)
    recipe = RecipeArguments(
        crop_size=[16], rescale_ratio_range=[1.0, 1.0], photometric_distortion=False, pad_pixel_value=128
    )
    image, label = Image.new("RGB", (12, 10), (128, 128, 128)), Image.new("L", (12, 10), 1)
    batch = TrainTransform(processor, recipe)({"image": [image], "label": [label]})
    pixel_values, labels = batch["pixel_values"][0], batch["labels"][0]
    assert pixel_values.shape == (3, 16, 16) and torch.all(labels[10:] == 255) and torch.all(labels[:10, :12] == 1)
    # every pixel, crop and padding alike, holds 128 as the processor normalises it
    expected = processor(image, do_resize=False, return_tensors="pt")["pixel_values"][0, :, 0, 0]
    assert expected.abs().min() > 0.05  # not the mean colour, which the padding holds by default
    assert torch.allclose(pixel_values, expected[:, None, None].expand(3, 16, 16), atol=1e-5)


def test_mask2former_defaults_and_explicit_flags(tmp_path, tiny_model):
    script = load_script("train_semask")
    _, _, recipe, args = script.parse_arguments(
        ["--dataset_name", "d", "--preset", "semask-large-mask2former-ade20k", "--output_dir", str(tmp_path)]
    )
    assert (args.learning_rate, args.weight_decay, args.warmup_steps, args.max_grad_norm) == (1e-4, 0.05, 0, 0.01)
    assert (recipe.backbone_lr_multiplier, recipe.poly_power, recipe.cat_max_ratio) == (0.1, 0.9, 1.0)
    assert recipe.pad_pixel_value == 128 and recipe.crop_size == [512, 512]
    options = ["--dataset_name", "d", "--preset", "semask-large-mask2former-ade20k", "--output_dir", str(tmp_path)]
    _, _, recipe, args = script.parse_arguments(
        [*options, "--max_grad_norm", "1", "--backbone_lr_multiplier", "1", "--warmup_steps", "5"]
    )
    assert (args.max_grad_norm, recipe.backbone_lr_multiplier, args.warmup_steps) == (1, 1, 5)
    processor = script.build_image_processor("ade20k", True, recipe, mask_classification=True)
    assert processor.size == {"shortest_edge": 640, "longest_edge": 2560} and processor.resize_library == "pil"

    # a SeMask-Mask2Former checkpoint on the demo data: the Mask2Former defaults, and no "tiny" preset added
    tiny_model.save_pretrained(tmp_path / "m2f")
    model_args, _, recipe, args = script.parse_arguments(
        ["--dataset_name", "demo", "--model_name_or_path", str(tmp_path / "m2f"), "--output_dir", str(tmp_path)]
    )
    assert model_args.preset is None and recipe.pad_pixel_value == 128 and args.max_grad_norm == 0.01


# --- the training script


def test_demo_training_through_the_script(tmp_path, capsys):
    output_dir = tmp_path / "run"
    script = load_script("train_semask")
    options = "--demo_train_size 64 --demo_validation_size 16 --demo_image_size 64 --image_scale 256 64"
    schedule = "--num_train_epochs 20 --eval_strategy no --logging_steps 20"
    metrics = script.main(
        ["--dataset_name", "demo", "--model_type", MASK2FORMER, "--output_dir", str(output_dir)]
        + options.split()
        + schedule.split()
    )
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0]
    assert metrics["eval_mean_iou"] > MIN_DEMO_MEAN_IOU and np.isfinite(metrics["eval_loss"])
    assert f"Validation mIoU: {metrics['eval_mean_iou']:.4f}" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == MASK2FORMER
    readme = (output_dir / "README.md").read_text()
    assert "mean_iou" in readme and "poly (power 0.9) with no warm-up" in readme
    assert "gradient norm clipped at 0.01" in readme

    # The Trainer's evaluation (semantic inference on the gathered class / mask predictions) equals a direct one.
    model = AutoModelForUniversalSegmentation.from_pretrained(output_dir).eval()
    processor = SemaskImageProcessor.from_pretrained(output_dir)
    data_args = script.DatasetArguments("demo", demo_train_size=64, demo_validation_size=16, demo_image_size=64)
    validation = script.load_segmentation_data(data_args).dataset["validation"]
    transform = EvalTransform(processor)
    metric = SegmentationMetric(model.config.num_labels)
    for start in range(0, len(validation), 8):
        rows = validation[start : start + 8]
        batch = transform(rows)
        batch = pad_collate([dict(zip(batch, values)) for values in zip(*batch.values())])
        with torch.no_grad():
            outputs = model(batch["pixel_values"])
        scores = semantic_inference(
            outputs.class_queries_logits, outputs.masks_queries_logits, batch["labels"].shape[-2:]
        )
        metric.update(scores.argmax(1), batch["labels"])
    assert metric.compute()["mean_iou"] == pytest.approx(metrics["eval_mean_iou"], abs=1e-6)


@pytest.mark.parametrize("pixel_decoder", ["fapn", "msfapn"])
def test_the_script_trains_the_fapn_decoders(tmp_path, pixel_decoder):
    output_dir = tmp_path / "run"
    data = "--dataset_name demo --demo_train_size 16 --demo_validation_size 4 --demo_image_size 64 --image_scale 256 64"
    schedule = "--num_train_epochs 6 --eval_strategy no --logging_steps 2 --per_device_train_batch_size 4"
    model = ["--model_type", MASK2FORMER, "--pixel_decoder", pixel_decoder, "--output_dir", str(output_dir)]
    load_script("train_semask").main(data.split() + schedule.split() + model)
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert json.loads((output_dir / "config.json").read_text())["pixel_decoder"] == pixel_decoder


def test_pixel_decoder_option_is_refused_where_it_does_not_apply():
    labels = {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="applies to SeMask-Mask2Former"):
        initialise_model(ModelArguments(preset="tiny", pixel_decoder="fapn"), labels)
    with pytest.raises(ValueError, match="contradicts the preset semask-large-mask2former-ade20k"):
        initialise_model(ModelArguments(preset="semask-large-mask2former-ade20k", pixel_decoder="fapn"), labels)
    with pytest.raises(ValueError, match="--pixel_decoder must be one of"):
        ModelArguments(preset="tiny", model_type=MASK2FORMER, pixel_decoder="fpn")
