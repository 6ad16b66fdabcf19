"""Every kind of model card semask writes has metadata the Hub accepts, checked offline.

`ModelCard.validate` posts the card to the Hub (`/api/validate-yaml`), which is not reachable here. Offline, the
checks are huggingface_hub's own parsing (strict `ModelCard` parsing, `metadata_load`, the `model_index_to_eval_results`
/ `eval_results_to_model_index` round trip) and the metadata spec the Hub verifies (hub-docs `modelcard.md`: the
model-index's required fields, Hub ids for datasets and base model, a license identifier, a pipeline task).
"""

import inspect
import math
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from packaging.licenses import canonicalize_license_expression
from transformers.pipelines import PIPELINE_REGISTRY

from conftest import (
    fpn_fixture_dir,
    load_script,
    mask2former_fixture_dir,
    tiny_config_kwargs,
    tiny_mask2former_config_kwargs,
    tiny_maskformer_config_kwargs,
    tiny_mit_config_kwargs,
)
from semask import SemaskConfig
from semask.configuration_semask_mask2former import SemaskMask2FormerConfig
from semask.configuration_semask_maskformer import SemaskMaskFormerConfig
from semask.configuration_semask_mit import SemaskMitConfig
from semask.conversion import main
from semask.modelcard import DATASETS, MODEL_KINDS, ORIGINAL_RESULTS, preset_dataset, write_model_card

FIXTURES = Path(__file__).parent / "fixtures"
HEADS = ["--decoder-attention-heads", "4"]
# Original fixture checkpoints converted without a preset (their tiny architectures match none), with the options
# they need (NHEADS is not in the MaskFormer and FaPN weights).
CONVERTED = {
    "fpn": lambda: (fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth", []),
    "mask2former": lambda: (mask2former_fixture_dir("tiny-ade") / "original_checkpoint.pth", []),
    "mask2former-fapn": lambda: (FIXTURES / "original_semask_fapn" / "tiny-fapn" / "original_checkpoint.pth", HEADS),
    "maskformer": lambda: (FIXTURES / "original_semask_maskformer" / "tiny" / "original_checkpoint.pth", HEADS),
}
# The Hub's model card fields as `ModelCardData` takes them; eval results and model name go into the model-index.
CARD_FIELDS = set(inspect.signature(ModelCardData).parameters) - {
    "eval_results",
    "model_name",
    "ignore_metadata_errors",
    "kwargs",
} | {"model-index"}
TINY_CONFIGS = {
    "fpn": lambda: SemaskConfig(**tiny_config_kwargs()),
    "mask2former": lambda: SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()),
    "maskformer": lambda: SemaskMaskFormerConfig(**tiny_maskformer_config_kwargs()),
    "mit": lambda: SemaskMitConfig(**tiny_mit_config_kwargs()),
}
TRAINER_METRICS = {
    "eval_loss": 0.52,
    "eval_mean_iou": 0.4375,
    "eval_mean_accuracy": 0.5625,
    "eval_overall_accuracy": 0.8125,
    "eval_per_category_iou": [0.5, math.nan, 0.25, 0.5, 0.5],
    "epoch": 2.0,
}


def check_hub_metadata(path) -> dict:
    """The card's metadata, once it passes huggingface_hub's parsing and the Hub's metadata spec."""
    metadata = metadata_load(path)
    card = ModelCard(Path(path).read_text(encoding="utf-8"))  # strict: a model-index that does not parse raises
    assert card.data.to_dict() == metadata  # huggingface_hub writes back exactly what the card holds
    assert set(metadata) <= CARD_FIELDS, set(metadata) - CARD_FIELDS
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] in PIPELINE_REGISTRY.get_supported_tasks()
    assert canonicalize_license_expression(metadata["license"]).lower() == metadata["license"]  # an SPDX id
    for key in ("tags", "datasets", "metrics"):
        values = metadata.get(key, [])
        assert isinstance(values, list) and all(isinstance(value, str) and value for value in values), key
        assert len(set(values)) == len(values), key
    assert not [tag for tag in metadata["tags"] if re.search(r"\s", tag)]
    for repo_id in [*metadata.get("datasets", []), *filter(None, [metadata.get("base_model")])]:
        validate_repo_id(repo_id)
    if "model-index" in metadata:
        check_model_index(metadata["model-index"])
    return metadata


def check_model_index(model_index: list) -> None:
    """The model-index round-trips through huggingface_hub, has the required fields and at least one result."""
    name, eval_results = model_index_to_eval_results(model_index)
    assert eval_results_to_model_index(name, eval_results) == model_index  # the round trip loses nothing
    assert len(model_index) == 1 and isinstance(name, str) and model_index[0]["results"]
    for result in model_index[0]["results"]:  # hub-docs modelcard.md: the required fields
        assert result["task"]["type"] == "image-segmentation"
        validate_repo_id(result["dataset"]["type"])
        assert isinstance(result["dataset"]["name"], str) and result["metrics"]
        for metric in result["metrics"]:
            assert isinstance(metric["type"], str) and type(metric["value"]) in (int, float)
            assert math.isfinite(metric["value"])
        if "source" in result:
            assert result["source"]["url"].startswith("https://")


def results_by_dataset(metadata: dict) -> dict:
    """{(dataset type, split, source name): {(metric type, metric config): value}} of the model-index."""
    return {
        (result["dataset"]["type"], result["dataset"].get("split"), result.get("source", {}).get("name")): {
            (metric["type"], metric.get("config")): metric["value"] for metric in result["metrics"]
        }
        for result in metadata["model-index"][0]["results"]
    }


@pytest.mark.parametrize("preset", sorted(ORIGINAL_RESULTS))
def test_preset_cards_carry_the_reported_numbers(tmp_path, preset):
    """Every released model (SeMask-FPN, SeMask-Mask2Former with its FaPN / MSFaPN presets, SeMask-MaskFormer)."""
    config_class = next(config_class for _, config_class, _, presets in MODEL_KINDS.values() if preset in presets)
    metadata = check_hub_metadata(write_model_card(tmp_path, config_class.from_preset(preset), preset=preset))
    dataset, reported = DATASETS[preset_dataset(preset)], ORIGINAL_RESULTS[preset]
    assert metadata["model-index"][0]["name"] == tmp_path.name
    assert results_by_dataset(metadata) == {
        (dataset.hub_id, dataset.split, "Original SeMask README (reported, not re-measured)"): {
            ("mean_iou", None): reported.mean_iou,
            ("mean_iou", "ms+flip"): reported.ms_flip_mean_iou,
        }
    }
    assert metadata["license"] == "apache-2.0" and metadata["datasets"] == [dataset.hub_id]
    assert preset_dataset(preset) in metadata["tags"]


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_converted_cards_without_preset_claim_no_results(tmp_path, name):
    checkpoint, extra = CONVERTED[name]()
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), *extra]) == 0
    metadata = check_hub_metadata(tmp_path / "out" / "README.md")
    assert "model-index" not in metadata and "datasets" not in metadata and "base_model" not in metadata
    assert metadata["license"] == "mit" and metadata["metrics"] == ["mean_iou"]


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_trainer_cards_put_the_measured_results_in_the_model_index(tmp_path, kind):
    """As `scripts/train_semask.py` writes them: Trainer metrics, the data's name, the checkpoint trained from."""
    path = write_model_card(
        tmp_path,
        TINY_CONFIGS[kind](),
        eval_results=TRAINER_METRICS,
        dataset_name="me/street-scenes",
        base_model="microsoft/swin-tiny-patch4-window7-224",
        training_summary="Trained 2 epochs.",
        model_id="me/semask-street",
    )
    metadata = check_hub_metadata(path)
    assert metadata["model-index"][0]["name"] == "me/semask-street"
    assert results_by_dataset(metadata) == {
        ("me/street-scenes", None, None): {
            ("mean_iou", None): 0.4375,
            ("mean_accuracy", None): 0.5625,
            ("overall_accuracy", None): 0.8125,
        }
    }
    assert metadata["datasets"] == ["me/street-scenes"] and "street-scenes" in metadata["tags"]
    assert metadata["base_model"] == "microsoft/swin-tiny-patch4-window7-224" and metadata["license"] == "mit"


def test_trainer_results_of_a_preset_stay_apart_from_the_reported_ones(tmp_path):
    preset = "semask-large-maskformer-ade20k"
    config = SemaskMaskFormerConfig.from_preset(preset)
    metadata = check_hub_metadata(
        write_model_card(tmp_path, config, preset=preset, eval_results={"eval_mean_iou": 0.5})
    )
    results = results_by_dataset(metadata)
    assert results[("scene_parse_150", None, None)] == {("mean_iou", None): 0.5}
    reported = results[("scene_parse_150", "validation", "Original SeMask README (reported, not re-measured)")]
    assert reported == {("mean_iou", None): 54.75, ("mean_iou", "ms+flip"): 56.15}


def test_names_that_are_not_hub_ids_stay_in_the_text(tmp_path):
    """The training script calls image/label folder pairs "custom image/label folders": not a Hub id, so no datasets
    metadata, tag or model-index entry; the results are in the text."""
    dataset_name = load_script("train_semask").dataset_title(None)
    assert dataset_name == "custom image/label folders"
    path = write_model_card(tmp_path, TINY_CONFIGS["fpn"](), eval_results=TRAINER_METRICS, dataset_name=dataset_name)
    metadata = check_hub_metadata(path)
    assert "model-index" not in metadata and "datasets" not in metadata
    assert metadata["tags"] == ["semask", "semantic-segmentation", "custom_code", "vision"]
    text = ModelCard.load(path).text
    assert "| eval_mean_iou | 0.4375 |" in text and "custom image/label folders" not in str(metadata)


def test_non_finite_results_are_left_out_of_the_model_index(tmp_path):
    dataset_name = load_script("train_semask").dataset_title("demo")
    eval_results = {**TRAINER_METRICS, "eval_mean_iou": math.nan}
    path = write_model_card(tmp_path, TINY_CONFIGS["fpn"](), eval_results=eval_results, dataset_name=dataset_name)
    metadata = check_hub_metadata(path)
    assert results_by_dataset(metadata) == {
        ("semask-demo", None, None): {("mean_accuracy", None): 0.5625, ("overall_accuracy", None): 0.8125}
    }
    assert "| eval_mean_iou | nan |" in ModelCard.load(path).text


def test_base_model_must_be_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="base_model must be a Hub model id .* got '/models/semask'"):
        write_model_card(tmp_path, TINY_CONFIGS["fpn"](), base_model="/models/semask")
    assert not (tmp_path / "README.md").exists()
