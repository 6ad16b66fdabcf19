"""Model cards: written offline next to the weights, loadable with `huggingface_hub.ModelCard`, complete."""

import math
import re

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from conftest import fpn_fixture_dir, tiny_config_kwargs
from semask import SemaskConfig
from semask.conversion import convert_checkpoint_file
from semask.modelcard import ORIGINAL_RESULTS, preset_mismatches, write_model_card
from semask.presets import MASK2FORMER_PRESET_NAMES, MASKFORMER_PRESET_NAMES, PRESET_NAMES

USAGE_SNIPPETS = (
    "import semask",
    'AutoModelForSemanticSegmentation.from_pretrained("{id}", trust_remote_code=True)',
    'pipeline("image-segmentation", model="{id}", trust_remote_code=True)',
    "predict_probabilities(model, processor, image, scales=MS_FLIP_SCALES, flip=True)",
    "python scripts/train_semask.py --model_name_or_path {id} --dataset_name DATASET",
    "compute_metrics=compute_metrics_for_trainer(model.config.num_labels)",
)


@pytest.fixture(scope="module")
def converted_fixture(tmp_path_factory):
    """The tiny original fixture checkpoint converted into a folder (which the conversion gives a card)."""
    folder = tmp_path_factory.mktemp("converted") / "semask-fixture"
    model = convert_checkpoint_file(fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth", folder)
    return model, folder


def card_parameters(text: str) -> int:
    return int(re.search(r"Parameters: [\d.]+M \(([\d,]+)\)", text).group(1).replace(",", ""))


def test_converted_fixture_card_describes_the_model(converted_fixture):
    model, folder = converted_fixture
    config = model.config
    card = ModelCard.load(folder / "README.md")
    data, text = card.data, card.text

    assert data.library_name == "transformers" and data.pipeline_tag == "image-segmentation"
    assert {"semask", "semantic-segmentation", "custom_code"} <= set(data.tags)
    assert data.license == "mit" and text.startswith("\n# semask-fixture\n")
    # no preset, no dataset: nothing to claim, no model-index (whose name would be the only model name)
    assert data.eval_results is None and data.model_name is None and data.datasets is None
    # architecture, read from the converted config
    assert f"embed_dim {config.embed_dim}, depths {list(config.depths)}, heads {list(config.num_heads)}" in text
    assert f"window {config.window_size}" in text and f"{config.decoder_hidden_size} channels" in text
    stages = zip(config.depths, config.num_heads, config.num_semantic_blocks, config.semantic_attention)
    for index, (depth, heads, blocks, kind) in enumerate(stages):
        assert f"| {index + 1} | {config.embed_dim * 2**index} | {depth} | {heads} | {blocks} | {kind} |" in text
    assert card_parameters(text) == sum(parameter.numel() for parameter in model.parameters())
    # labels
    assert f"{config.num_labels} classes" in text
    assert all(f"| {index} | {name} |" in text for index, name in config.id2label.items())
    # evaluation protocol: the saved processor's (default: the ADE20K pipeline)
    assert "fit 2048x512" in text and "123.675, 116.28, 103.53" in text and "58.395, 57.12, 57.375" in text
    assert "label k becomes k - 1" in text and "0.5, 0.75, 1, 1.25, 1.5, 1.75" in text
    assert "The whole image is segmented at once" in text
    assert all(snippet.format(id="semask-fixture") in text for snippet in USAGE_SNIPPETS)
    assert "MIT license" in text and "Apache" not in text
    assert "@inproceedings{jain2023semask" in text and "ICCV Workshops 2023" in text
    assert "## Results" not in text  # nothing measured, nothing reported


def test_existing_card_is_kept_unless_overwrite(converted_fixture):
    _, folder = converted_fixture
    before = (folder / "README.md").read_text()
    with pytest.raises(FileExistsError, match="README.md already exists; pass overwrite=True"):
        write_model_card(folder, converted_fixture[0].config)
    assert (folder / "README.md").read_text() == before


def test_eval_results_go_to_the_text_and_the_model_index(converted_fixture, tmp_path):
    model, _ = converted_fixture
    num_labels = model.config.num_labels
    per_class = [0.25 * (index % 4) for index in range(num_labels)]
    per_class[1] = math.nan  # a class absent from the evaluation set
    eval_results = {
        "eval_loss": 0.4321,
        "eval_mean_iou": 0.6125,
        "eval_mean_accuracy": 0.7,
        "eval_overall_accuracy": np.float64(0.85),  # numpy scalars count as numbers too
        "eval_per_category_iou": per_class,
        "eval_runtime": 1.5,
        "epoch": 3.0,
    }
    path = write_model_card(
        tmp_path,
        model.config,
        eval_results=eval_results,
        dataset_name="me/street-scenes",
        base_model="me/semask-base",
        training_summary="Trained 3 epochs with AdamW.",
        model_id="me/semask-street",
    )
    card = ModelCard.load(path)
    metrics = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert metrics == {"mean_iou": 0.6125, "mean_accuracy": 0.7, "overall_accuracy": 0.85}
    assert {result.dataset_type for result in card.data.eval_results} == {"me/street-scenes"}
    assert card.data.datasets == ["me/street-scenes"] and "street-scenes" in card.data.tags
    assert card.data.base_model == "me/semask-base"
    text = card.text
    assert "| eval_mean_iou | 0.6125 |" in text and "| eval_loss | 0.4321 |" in text and "| epoch | 3 |" in text
    assert f"| {model.config.id2label[1]} | n/a |" in text and f"| {model.config.id2label[3]} | 0.75 |" in text
    assert "## Training\n\nTrained 3 epochs with AdamW." in text and "Fine-tuned from [me/semask-base]" in text
    assert 'from_pretrained("me/semask-street")' in text


@pytest.mark.parametrize(
    ("preset", "protocol", "split", "hub_id", "released_millions"),
    [
        ("semask-tiny-fpn-ade20k", "fit 2048x512", "validation", "scene_parse_150", 35),
        ("semask-base-fpn-cityscapes", "fit 2048x1024", "validation", "cityscapes", 96),
        ("semask-large-fpn-coco-stuff10k", "fit 2048x512", "test", "coco-stuff10k", 211),
    ],
)
def test_preset_card_reports_the_original_numbers(tmp_path, preset, protocol, split, hub_id, released_millions):
    config = SemaskConfig.from_preset(preset)
    card = ModelCard.load(write_model_card(tmp_path, config, preset=preset))
    reported = ORIGINAL_RESULTS[preset]
    results = {result.metric_config: result for result in card.data.eval_results}
    assert results[None].metric_value == reported.mean_iou and results["ms+flip"].metric_value == (
        reported.ms_flip_mean_iou
    )
    assert {(r.dataset_type, r.dataset_split, r.metric_type) for r in results.values()} == {(hub_id, split, "mean_iou")}
    assert all("github.com/Picsart-AI-Research/SeMask-Segmentation" in r.source_url for r in results.values())
    assert card.data.license == "apache-2.0" and card.data.datasets == [hub_id]
    assert preset.split("-", 3)[3] in card.data.tags
    text = card.text
    assert f"| {preset} | " in text and f"| {reported.mean_iou:.2f} | {reported.ms_flip_mean_iou:.2f} |" in text
    assert protocol in text and ("no label reduction" in text) == (hub_id == "cityscapes")
    assert (f"<summary>All {config.num_labels} labels</summary>" in text) == (config.num_labels > 20)  # folded
    last = config.num_labels - 1
    assert f"| {last} | {config.id2label[last]} |" in text
    assert abs(card_parameters(text) / 1e6 - released_millions) < 1.0
    assert "Apache License 2.0" in text and "MIT license" in text
    assert "Swin-" + preset.split("-")[1][0].upper() in text


def test_measured_results_are_not_attributed_to_the_original_readme(tmp_path):
    preset = "semask-tiny-fpn-ade20k"
    config = SemaskConfig.from_preset(preset)
    path = write_model_card(tmp_path, config, preset=preset, eval_results={"eval_mean_iou": 0.4})
    sources = {result.metric_value: result.source_name for result in ModelCard.load(path).data.eval_results}
    assert sources[0.4] is None
    assert sources[42.06] == sources[43.36] == "Original SeMask README (reported, not re-measured)"


def test_every_preset_has_reported_numbers():
    assert set(ORIGINAL_RESULTS) == set(PRESET_NAMES + MASK2FORMER_PRESET_NAMES + MASKFORMER_PRESET_NAMES)
    assert ORIGINAL_RESULTS["semask-small-fpn-cityscapes"].ms_flip_mean_iou == 79.14


def test_preset_must_describe_the_config(tmp_path):
    with pytest.raises(ValueError, match="does not match preset 'semask-tiny-fpn-ade20k' \\(different embed_dim"):
        write_model_card(tmp_path, SemaskConfig(**tiny_config_kwargs()), preset="semask-tiny-fpn-ade20k")
    with pytest.raises(ValueError, match="Unknown SeMask preset 'semask-huge-fpn-ade20k'"):
        write_model_card(tmp_path, SemaskConfig(**tiny_config_kwargs()), preset="semask-huge-fpn-ade20k")
    assert not (tmp_path / "README.md").exists()
    changed = SemaskConfig.from_preset("semask-tiny-fpn-ade20k", semantic_attention=["windowed"] * 4)
    assert preset_mismatches(changed, "semask-tiny-fpn-ade20k") == ["semantic_attention"]


def test_parameter_count_needs_no_weights(tmp_path):
    """The count comes from a meta-device model; it equals the real model's."""
    from semask import SemaskForSemanticSegmentation

    config = SemaskConfig(**tiny_config_kwargs())
    text = ModelCard.load(write_model_card(tmp_path, config)).text
    assert card_parameters(text) == sum(p.numel() for p in SemaskForSemanticSegmentation(config).parameters())
    assert torch.get_default_device().type == "cpu"
