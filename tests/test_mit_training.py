"""Fine-tuning SeMask-MiT: model-kind selection (SegFormer checkpoints imply it), initialisation from SegFormer
weights, SegFormer's recipe (head at 10x the encoder's rate, weight decay groups, defaults), and the training script
end to end on the demo data."""

import json

import pytest
import torch
from test_training import MIN_DEMO_MEAN_IOU, assert_only_reinitialised_weights_changed, load_script, make_trainer
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SwinConfig, SwinModel

from conftest import tiny_mit_config_kwargs
from semask import SemaskMitConfig, SemaskMitForSemanticSegmentation
from semask.training import ModelArguments, initialise_model, no_weight_decay_parameter_names, resolve_model_type

MIT = "semask_mit"
ARCHITECTURE = ("hidden_sizes", "depths", "num_attention_heads", "decoder_hidden_size")


@pytest.fixture
def segformer_folder(tmp_path):
    """A random tiny SegFormer segmenter with the tiny SeMask-MiT's architecture and labels."""
    torch.manual_seed(0)
    settings = tiny_mit_config_kwargs()
    config = SegformerConfig(**{key: settings[key] for key in ARCHITECTURE}, id2label=settings["id2label"])
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "segformer")
    return tmp_path / "segformer"


def test_segformer_checkpoints_and_mit_presets_imply_semask_mit(tmp_path, segformer_folder):
    assert resolve_model_type(ModelArguments(model_name_or_path=str(segformer_folder))) == MIT
    assert resolve_model_type(ModelArguments(preset="semask-mit-b2-ade20k")) == MIT
    assert resolve_model_type(ModelArguments(preset="tiny", model_type=MIT)) == MIT
    SemaskMitForSemanticSegmentation(SemaskMitConfig(**tiny_mit_config_kwargs())).save_pretrained(tmp_path / "mit")
    assert resolve_model_type(ModelArguments(model_name_or_path=str(tmp_path / "mit"))) == MIT

    with pytest.raises(ValueError, match="--model_type semask contradicts the checkpoint .*'semask_mit'"):
        resolve_model_type(ModelArguments(model_name_or_path=str(segformer_folder), model_type="semask"))
    with pytest.raises(ValueError, match="contradicts the preset 'semask-mit-b0-ade20k'"):
        resolve_model_type(ModelArguments(preset="semask-mit-b0-ade20k", model_type="semask_mask2former"))
    SwinModel(SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[1, 2])).save_pretrained(tmp_path / "swin")
    with pytest.raises(ValueError, match="Mix Transformer encoder: start it from a SegFormer / MiT checkpoint"):
        resolve_model_type(ModelArguments(model_name_or_path=str(tmp_path / "swin"), model_type=MIT))


def test_initialisation_from_segformer_loads_the_encoder_and_the_fitting_head(segformer_folder):
    segformer = SegformerForSemanticSegmentation.from_pretrained(segformer_folder)
    same_labels = segformer.config.id2label
    model, report = initialise_model(ModelArguments(model_name_or_path=str(segformer_folder)), same_labels)
    assert isinstance(model, SemaskMitForSemanticSegmentation)
    assert report.source == f"the SegFormer checkpoint {segformer_folder}" and report.unused == []
    # only the semantic blocks are new; the encoder and the MLP head (same labels and width) are SegFormer's
    assert report.reinitialised and all(".semantic_layer." in name for name in report.reinitialised)
    theirs = segformer.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in report.reinitialised:
            assert torch.equal(tensor, theirs[name]), name

    new_labels = {0: "a", 1: "b"}
    arguments = ModelArguments(model_name_or_path=str(segformer_folder), drop_path_rate=0.2)
    model, report = initialise_model(arguments, new_labels)
    assert model.config.id2label == new_labels and model.config.drop_path_rate == 0.2
    assert model.decode_head.classifier.out_channels == 2
    assert any(name.startswith("decode_head.") for name in report.reinitialised)
    assert not any(name.startswith("segformer.stages.0.blocks.") for name in report.reinitialised)


def test_a_semask_mit_checkpoint_reinitialises_only_the_class_weights_for_new_labels(tmp_path):
    torch.manual_seed(0)
    source = SemaskMitForSemanticSegmentation(SemaskMitConfig(**tiny_mit_config_kwargs()))
    source.save_pretrained(tmp_path / "source")
    model, report = initialise_model(ModelArguments(model_name_or_path=str(tmp_path / "source")), {0: "a", 1: "b"})
    assert report.source == f"the SeMask-MiT checkpoint {tmp_path / 'source'}"
    semantic_projections = [
        f"segformer.stages.{stage}.semantic_layer.blocks.0.{projection}.{kind}"
        for stage in range(4)
        for projection in ("q_proj", "k_proj")
        for kind in ("weight", "bias")
    ]
    classifier = ["decode_head.classifier.bias", "decode_head.classifier.weight"]
    assert report.reinitialised == sorted(semantic_projections + classifier) and report.unused == []
    assert_only_reinitialised_weights_changed(model, source, report, tmp_path / "source")


def test_segformer_recipe_head_at_ten_times_the_encoder_rate(tmp_path):
    script = load_script("train_semask")
    options = ["--dataset_name", "d", "--preset", "semask-mit-b2-ade20k", "--output_dir", str(tmp_path)]
    _, _, recipe, args = script.parse_arguments(options)
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (6e-4, 0.01, 1500)
    assert (recipe.backbone_lr_multiplier, recipe.poly_power, recipe.warmup_ratio) == (0.1, 1.0, 1e-6)
    _, _, recipe, args = script.parse_arguments([*options, "--learning_rate", "1e-3", "--backbone_lr_multiplier", "1"])
    assert (args.learning_rate, recipe.backbone_lr_multiplier) == (1e-3, 1)
    # the demo's randomly initialised encoder learns at the head's rate
    _, _, recipe, args = script.parse_arguments(["--dataset_name", "demo", "--model_type", MIT, "--output_dir", "x"])
    assert recipe.backbone_lr_multiplier == 1 and args.learning_rate == 1e-3

    model = SemaskMitForSemanticSegmentation(SemaskMitConfig(**tiny_mit_config_kwargs()))
    excluded = no_weight_decay_parameter_names(model)
    layer_norms = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    assert excluded == layer_norms  # SegFormer's 'norm' key; the head's BatchNorm ("batch_norm" here) decays
    optimizer = make_trainer(tmp_path, model, backbone_lr_multiplier=0.1).create_optimizer()  # lr 0.1, decay 0.05
    settings = {
        id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    named = dict(model.named_parameters())
    assert len(settings) == len(named)
    for name, parameter in named.items():
        expected = (0.01 if name.startswith("segformer.") else 0.1, 0.0 if name in excluded else 0.05)
        assert settings[id(parameter)] == pytest.approx(expected), name


def test_demo_training_through_the_script(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    options = "--demo_train_size 64 --demo_validation_size 16 --demo_image_size 64 --image_scale 256 64"
    schedule = "--num_train_epochs 12 --warmup_steps 10 --eval_strategy no --logging_steps 12"
    script = load_script("train_semask")
    allocator_calls = []
    monkeypatch.setattr(script, "keep_freed_memory", lambda: allocator_calls.append(True))
    metrics = script.main(
        ["--dataset_name", "demo", "--model_type", MIT, "--output_dir", str(output_dir), *options.split()]
        + schedule.split()
    )
    log_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]
    assert metrics["eval_mean_iou"] > MIN_DEMO_MEAN_IOU
    assert f"Validation mIoU: {metrics['eval_mean_iou']:.4f}" in capsys.readouterr().out
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == MIT
    readme = (output_dir / "README.md").read_text()
    assert "SeMask-MiT (custom MiT)" in readme and "No official SeMask-MiT code or weights exist" in readme
    assert "encoder learning rate" not in readme and "mean_iou" in readme
    assert len(list((output_dir / "predictions").glob("*_overlay.png"))) == 4
    assert allocator_calls == [True]  # CPU training keeps freed memory for reuse by default
