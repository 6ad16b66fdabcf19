"""The training recipe (augmentation, optimiser groups, schedule, OHEM, initialisation) and the training script."""

import json
import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from transformers import SwinConfig, SwinModel, TrainingArguments

from conftest import load_script, tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.image_processing_semask import SemaskImageProcessor
from semask.training import (
    CatMaxRatioRandomCrop,
    ModelArguments,
    PadToSize,
    RecipeArguments,
    SemaskTrainer,
    TrainTransform,
    initialise_model,
    no_weight_decay_parameter_names,
    ohem_cross_entropy,
    poly_warmup_factor,
)

# Measured: the test configuration below reaches a validation mIoU of 0.71 (6 classes; chance is below 0.17).
MIN_DEMO_MEAN_IOU = 0.5


def half_and_half_pair(height=20, width=100):
    """An image whose red channel holds the column index, and a mask: class 0 left, class 1 right."""
    columns = torch.arange(width).expand(height, width)
    image = tv_tensors.Image(torch.stack([columns, columns, columns]).to(torch.uint8))
    mask = tv_tensors.Mask((columns >= width // 2).long())
    return image, mask


# --- augmentation


def test_cat_max_ratio_crop_redraws_like_mmseg(monkeypatch):
    image, mask = half_and_half_pair()
    torch.manual_seed(0)

    def share_of_balanced_crops(cat_max_ratio: float) -> float:
        crop = CatMaxRatioRandomCrop((20, 20), cat_max_ratio=cat_max_ratio)
        balanced = 0
        for _ in range(300):
            cropped_image, cropped_mask = crop(image, mask)
            # image and mask are cropped alike: the column code agrees with the class everywhere
            assert torch.equal(cropped_mask, (cropped_image[0] >= 50).long())
            balanced += 0.25 < cropped_mask.float().mean().item() < 0.75
        return balanced / 300

    # One draw is balanced with probability 9/81; with up to 10 re-draws, 1 - (72/81)^11 = 0.73.
    assert share_of_balanced_crops(1.0) == pytest.approx(9 / 81, abs=0.06)
    assert share_of_balanced_crops(0.75) == pytest.approx(1 - (72 / 81) ** 11, abs=0.08)

    draws = []
    crop = CatMaxRatioRandomCrop((20, 20), cat_max_ratio=0.75)
    original_draw = crop._random_box
    monkeypatch.setattr(crop, "_random_box", lambda *size: draws.append(size) or original_draw(*size))
    crop(image, tv_tensors.Mask(torch.zeros_like(mask)))  # one class only: never balanced
    assert len(draws) == 11  # the first draw and mmseg's 10 re-draws, the last one is kept


def test_crop_never_exceeds_image_and_padding_uses_ignore_index():
    image = tv_tensors.Image(torch.full((3, 5, 7), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(5, 7, dtype=torch.long))
    cropped_image, cropped_mask = CatMaxRatioRandomCrop((8, 8), cat_max_ratio=0.75)(image, mask)
    assert cropped_image.shape == (3, 5, 7) and cropped_mask.shape == (5, 7)
    padded_image, padded_mask = PadToSize((8, 9))(image.float(), mask)
    assert padded_image.shape == (3, 8, 9) and padded_mask.shape == (8, 9)
    assert torch.all(padded_image[:, :5, :7] == 200) and torch.all(padded_mask[:5, :7] == 1)
    assert torch.all(padded_image[:, 5:] == 0) and torch.all(padded_image[:, :, 7:] == 0)
    assert torch.all(padded_mask[5:] == 255) and torch.all(padded_mask[:, 7:] == 255)


def test_train_transform_output():
    """Small images are padded to the crop (0 after normalisation, label 255); labels are reduced like the processor."""
    processor = SemaskImageProcessor(size={"longest_edge": 40, "shortest_edge": 10}, do_reduce_labels=True)
    recipe = RecipeArguments(crop_size=[16, 24], rescale_ratio_range=[1.0, 1.0], photometric_distortion=False)
    transform = TrainTransform(processor, recipe)
    image = np.full((10, 12, 3), 128, dtype=np.uint8)
    label = np.array([0, 1, 2, 3], dtype=np.uint8).repeat(3)[None].repeat(10, axis=0)  # (10, 12)
    from PIL import Image

    batch = transform({"image": [Image.fromarray(image)], "label": [Image.fromarray(label)]})
    pixel_values, labels = batch["pixel_values"][0], batch["labels"][0]
    assert pixel_values.shape == (3, 16, 24) and labels.shape == (16, 24) and labels.dtype == torch.int64
    expected = (128 - torch.tensor(processor.image_mean)) / torch.tensor(processor.image_std)
    assert torch.allclose(pixel_values[:, :10, :12].mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.all(pixel_values[:, 10:] == 0) and torch.all(pixel_values[:, :, 12:] == 0)
    assert set(labels[:10, :12].unique().tolist()) == {255, 0, 1, 2}  # 0 -> ignored, k -> k - 1
    assert torch.all(labels[10:] == 255) and torch.all(labels[:, 12:] == 255)


# --- optimiser, schedule, loss


def make_trainer(tmp_path, model, **recipe_kwargs) -> SemaskTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=0.1, weight_decay=0.05, warmup_steps=10
    )
    return SemaskTrainer(model=model, args=args, recipe=RecipeArguments(**recipe_kwargs))


def test_weight_decay_groups(tmp_path):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(use_absolute_embeddings=True)))
    excluded = no_weight_decay_parameter_names(model)
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    # per stage: 2 blocks x 2 norms + semantic layer norm; 3 patch-merging norms; 4 output norms; embedding norm
    assert len(layer_norms) == 4 * 5 + 3 + 4 + 1
    tables = [name for name in excluded if name.endswith("relative_position_bias_table")]
    assert len(tables) == sum(model.config.depths)
    assert len(excluded) == 2 * len(layer_norms) + len(tables) + 1
    assert "semask.embeddings.position_embeddings" in excluded
    optimizer = make_trainer(tmp_path, model).create_optimizer()
    by_decay = {group["weight_decay"]: group["params"] for group in optimizer.param_groups}
    named = dict(model.named_parameters())
    decayed = {name for name, parameter in named.items() if any(parameter is p for p in by_decay[0.05])}
    assert decayed == set(named) - excluded
    # the original decays biases and the decode head's BatchNorms (its "norm" key does not match mmcv's "bn")
    assert "decode_head.classifier.bias" in decayed and "decode_head.scale_heads.0.0.batch_norm.weight" in decayed
    default = make_trainer(tmp_path, model, original_weight_decay_groups=False).get_decay_parameter_names(model)
    assert "decode_head.classifier.bias" not in default


def test_poly_schedule_with_linear_warmup(tmp_path):
    # mmcv: lr = base * (1 - t / T) ** power, times 1 - (1 - t / W) * (1 - ratio) while t < W
    factor = lambda step, power=1.0: poly_warmup_factor(  # noqa: E731
        step, total_steps=100, warmup_steps=10, warmup_ratio=1e-6, power=power
    )
    assert factor(0) == pytest.approx(1e-6)
    assert factor(5) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert factor(10) == pytest.approx(0.9) and factor(60) == pytest.approx(0.4) and factor(100) == 0
    assert factor(60, power=0.9) == pytest.approx(0.4**0.9)

    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    trainer = make_trainer(tmp_path, model)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=100)
    learning_rates = []
    for _ in range(100):
        learning_rates.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    assert learning_rates == pytest.approx([0.1 * factor(step) for step in range(100)], rel=1e-9, abs=1e-15)
    assert max(learning_rates) == pytest.approx(0.1 * factor(10))


def numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel losses and true-class probabilities, computed directly (ignored pixels get index 0)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_probabilities, np.where(labels == 255, 0, labels)[:, None], axis=1)[:, 0]
    return -picked, np.exp(picked)


def test_ohem_matches_direct_computation():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 8, 8), generator=generator)
    labels[0, :2] = 255
    losses, probabilities = numpy_cross_entropy(logits.numpy(), labels.numpy())
    valid = labels.numpy() != 255

    # the 2 x 10 highest valid losses, summed over all 128 pixels (mmseg's mean)
    expected = np.sort(losses[valid])[::-1][:20].sum() / labels.numel()
    assert ohem_cross_entropy(logits, labels, min_kept=10).item() == pytest.approx(expected, rel=1e-12)
    kept_mean = np.sort(losses[valid])[::-1][:20].mean()
    ohem_valid = ohem_cross_entropy(logits, labels, min_kept=10, loss_reduction="valid_pixels")
    assert ohem_valid.item() == pytest.approx(kept_mean, rel=1e-12)

    # with a threshold: probability below max(threshold, the 20th lowest valid probability)
    for threshold in (0.1, 0.7):
        cut = max(threshold, np.sort(probabilities[valid])[20])
        expected = losses[valid & (probabilities < cut)].sum() / labels.numel()
        result = ohem_cross_entropy(logits, labels, min_kept=10, threshold=threshold)
        assert result.item() == pytest.approx(expected, rel=1e-12)

    # keeping every pixel gives the plain cross-entropy over all pixels
    plain = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none").mean()
    assert ohem_cross_entropy(logits, labels, min_kept=1000).item() == pytest.approx(plain.item(), rel=1e-12)


def test_trainer_ohem_loss_keeps_semantic_term(tmp_path, monkeypatch):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 5, (2, 32, 32))}
    inputs["labels"][:, :4] = 255
    plain = model(**inputs).loss
    # the OHEM loss replaces the plain decode loss, which is then not computed at all
    monkeypatch.setattr(model, "decode_loss", lambda *args: pytest.fail("the plain decode loss was computed"))
    everything = make_trainer(tmp_path, model, ohem=True, ohem_min_kept=10**6).compute_loss(model, inputs)
    assert everything.item() == pytest.approx(plain.item(), rel=1e-5)
    hard = make_trainer(tmp_path, model, ohem=True, ohem_min_kept=100).compute_loss(model, inputs)
    outputs = model(inputs["pixel_values"])
    logits = torch.nn.functional.interpolate(outputs.logits, size=(32, 32), mode="bilinear")
    decode = ohem_cross_entropy(logits, inputs["labels"], min_kept=100)
    semantic = model.semantic_loss(outputs.semantic_logits, inputs["labels"])
    assert hard.item() == pytest.approx((decode + semantic).item(), rel=1e-5)
    assert 0 < hard.item() < plain.item()


# --- initialisation


def test_reinitialisation_report_for_new_label_set(tmp_path):
    source = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    source.save_pretrained(tmp_path / "source")
    new_labels = {0: "a", 1: "b", 2: "c"}
    model, report = initialise_model(ModelArguments(model_name_or_path=str(tmp_path / "source")), new_labels)
    per_stage = [
        f"semask.encoder.layers.{stage}.semantic_layer.blocks.0.{projection}.{kind}"
        for stage in range(4)
        for projection in ("q_proj", "k_proj")
        for kind in ("weight", "bias")
    ]
    assert report.reinitialised == sorted(per_stage + ["decode_head.classifier.bias", "decode_head.classifier.weight"])
    assert "Newly initialised (18): decode_head.classifier.bias" in str(report)
    assert model.config.id2label == new_labels and model.decode_head.classifier.out_channels == 3
    assert_only_reinitialised_weights_changed(model, source, report, tmp_path / "source")


def assert_only_reinitialised_weights_changed(model, source, report, source_folder) -> None:
    """Every weight the report does not list equals the source's; the source's own labels re-initialise nothing."""
    source_state = source.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in report.reinitialised and "relative_position_index" not in name:
            assert torch.equal(tensor, source_state[name]), name
    _, same_labels = initialise_model(ModelArguments(model_name_or_path=str(source_folder)), source.config.id2label)
    assert same_labels.reinitialised == [] and same_labels.unused == []


def test_initialisation_from_swin_and_presets(tmp_path):
    swin_config = SwinConfig(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=4, mlp_ratio=2.0)
    SwinModel(swin_config).save_pretrained(tmp_path / "swin")
    labels = {0: "a", 1: "b"}
    model, report = initialise_model(ModelArguments(model_name_or_path=str(tmp_path / "swin")), labels)
    assert report.source.startswith("the Swin checkpoint") and model.config.num_labels == 2
    assert any(name.startswith("decode_head.") for name in report.reinitialised)
    assert not any(".blocks.0.attention." in name and "semantic" not in name for name in report.reinitialised)

    model, report = initialise_model(ModelArguments(preset="semask-tiny-fpn-ade20k", drop_path_rate=0.0), labels)
    # the original picks windowed semantic attention everywhere for 19 classes or fewer
    assert model.config.embed_dim == 96 and model.config.semantic_attention == ("windowed",) * 4
    assert model.config.drop_path_rate == 0.0 and "random weights" in report.source
    with pytest.raises(ValueError, match="either --model_name_or_path or --preset"):
        initialise_model(ModelArguments(model_name_or_path="x", preset="tiny"), labels)


# --- the training script


def test_explicit_flags_win_over_demo_and_recipe_defaults(tmp_path):
    script = load_script("train_semask")
    model_args, data_args, recipe, args = script.parse_arguments(
        ["--dataset_name", "demo", "--output_dir", str(tmp_path), "--learning_rate", "0.5", "--crop_size", "32", "48"]
    )
    assert args.learning_rate == 0.5 and recipe.crop_size == [32, 48]
    assert model_args.preset == "tiny" and args.num_train_epochs == 16 and args.weight_decay == 0.01
    assert args.remove_unused_columns is False and args.batch_eval_metrics is True
    _, _, recipe, args = script.parse_arguments(["--dataset_name", "d", "--output_dir", str(tmp_path), "--ohem"])
    assert (args.learning_rate, args.weight_decay, args.warmup_steps) == (1e-4, 1e-4, 1500)
    assert recipe.ohem and recipe.crop_size == [512, 512]


def test_demo_training_reaches_high_miou(tmp_path, capsys):
    output_dir = tmp_path / "run"
    script = load_script("train_semask")
    options = "--demo_train_size 64 --demo_validation_size 16 --demo_image_size 64 --image_scale 256 64"
    schedule = "--num_train_epochs 12 --warmup_steps 10 --eval_strategy no"
    metrics = script.main(
        ["--dataset_name", "demo", "--output_dir", str(output_dir), *options.split(), *schedule.split()]
    )
    assert metrics["eval_mean_iou"] > MIN_DEMO_MEAN_IOU
    assert f"Validation mIoU: {metrics['eval_mean_iou']:.4f}" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "eval_results.json").read_text())
    assert saved["eval_mean_iou"] == metrics["eval_mean_iou"] and len(saved["eval_per_category_iou"]) == 6
    assert len(list((output_dir / "predictions").glob("*_overlay.png"))) == 4
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"longest_edge": 256, "shortest_edge": 64} and processor["do_reduce_labels"] is False
    assert "mean_iou" in (output_dir / "README.md").read_text()
    assert not math.isnan(metrics["eval_loss"])
    with pytest.raises(SystemExit, match="exists and is not empty"):
        script.main(["--dataset_name", "demo", "--output_dir", str(output_dir)])
