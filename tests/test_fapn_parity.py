"""Converted original SeMask-Mask2Former-FaPN / -MSFaPN checkpoints reproduce every tensor and loss of the original
code (whole-model fixtures: batch 2, an input that needs padding)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_mask2former_auto import run_remote_script, write_remote_inputs

from conftest import assert_mask_classification_outputs_match
from semask import SemaskMask2FormerForUniversalSegmentation
from semask.conversion import main
from semask.inference import semantic_inference
from semask.modeling_semask_mask_classification import mask_classification_targets

FIXTURES = Path(__file__).parent / "fixtures" / "original_semask_fapn"
DECODERS = {"tiny-fapn": "fapn", "tiny-msfapn": "msfapn"}
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NUM_AUX = 3  # DEC_LAYERS 4: the learnable queries' prediction and 2 decoder layers before the final one
LOSS_NAMES = (("loss_ce", "loss_cross_entropy"), ("loss_mask", "loss_mask"), ("loss_dice", "loss_dice"))


@pytest.fixture(scope="module", params=sorted(DECODERS))
def fixture(request, tmp_path_factory):
    """(name, recorded tensors, the checkpoint converted with the command line; NHEADS is not in FaPN's weights)."""
    folder = FIXTURES / request.param
    output = tmp_path_factory.mktemp("converted") / request.param
    arguments = ["--checkpoint", str(folder / "original_checkpoint.pth"), "--output", str(output)]
    assert main([*arguments, "--decoder-attention-heads", "4"]) == 0
    return request.param, load_file(folder / "io.safetensors"), output


def auxiliary_predictions(expected: dict) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "class_queries_logits": expected[f"aux.{i}.pred_logits"],
            "masks_queries_logits": expected[f"aux.{i}.pred_masks"],
        }
        for i in range(NUM_AUX)
    ]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_model_reproduces_every_original_tensor(fixture, attn_implementation):
    name, expected, converted = fixture
    model = SemaskMask2FormerForUniversalSegmentation.from_pretrained(
        converted, attn_implementation=attn_implementation
    )
    assert model.config.pixel_decoder == DECODERS[name] and not model.training
    pixel_values = expected["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, output_auxiliary_logits=True)

    assert_mask_classification_outputs_match(outputs, expected, NUM_AUX, TOLERANCE)
    for index in range(3):
        actual = outputs.pixel_decoder_hidden_states[index]
        torch.testing.assert_close(actual, expected[f"multi_scale_features.{index}"], **TOLERANCE)
    scores = semantic_inference(outputs.class_queries_logits, outputs.masks_queries_logits, pixel_values.shape[-2:])
    torch.testing.assert_close(scores, expected["semantic_segmentation"], **TOLERANCE)


def test_losses_and_matching_equal_the_original_under_the_recorded_seed(fixture):
    """loss_cate is deterministic; the point-sampled losses match given the original outputs and the seed 2024."""
    _, expected, converted = fixture
    model = SemaskMask2FormerForUniversalSegmentation.from_pretrained(converted, train_num_points=64)
    labels = torch.stack([expected[f"target.{image}.seg_map"] for image in range(2)])
    mask_labels, class_labels = mask_classification_targets(labels)
    for image in range(2):
        torch.testing.assert_close(class_labels[image], expected[f"target.{image}.labels"], rtol=0, atol=0)
        torch.testing.assert_close(mask_labels[image], expected[f"target.{image}.masks"][:, :75, :101].float())
    padded = [expected[f"target.{image}.masks"].float() for image in range(2)]
    predictions = (expected["pred_masks"], expected["pred_logits"])

    torch.manual_seed(2024)
    matches = model.criterion.matcher(*predictions, padded, class_labels)
    torch.manual_seed(2024)
    raw = model.criterion(*predictions, padded, class_labels, auxiliary_predictions(expected))
    torch.manual_seed(2024)
    weighted = model.loss_terms(
        *predictions, auxiliary_predictions(expected), expected["sem_predictions"], labels=labels
    )

    for image, (queries, targets) in enumerate(matches):
        torch.testing.assert_close(queries, expected[f"match.final.{image}.query_index"], rtol=0, atol=0)
        torch.testing.assert_close(targets, expected[f"match.final.{image}.target_index"], rtol=0, atol=0)
    padded_labels = torch.stack([expected[f"target.{image}.seg_map_padded"] for image in range(2)])
    torch.testing.assert_close(
        model.semantic_loss(expected["sem_predictions"], padded_labels), expected["loss_raw.loss_cate"]
    )
    for suffix in ["", *(f"_{index}" for index in range(NUM_AUX))]:
        for original, ours in LOSS_NAMES:
            torch.testing.assert_close(raw[ours + suffix], expected[f"loss_raw.{original}{suffix}"])
            torch.testing.assert_close(weighted[ours + suffix], expected[f"loss.{original}{suffix}"])
    torch.testing.assert_close(weighted["loss_semantic"], expected["loss.loss_cate"])
    torch.testing.assert_close(model.get_loss(weighted), expected["loss.total"])


def test_conversion_infers_the_fixture_configuration(fixture):
    name, _, converted = fixture
    original = json.loads((FIXTURES / name / "original_config.json").read_text())
    head, mask_former = original["MODEL"]["SEM_SEG_HEAD"], original["MODEL"]["MASK_FORMER"]
    config = json.loads((converted / "config.json").read_text())
    assert config["pixel_decoder"] == DECODERS[name]
    assert config["backbone_config"]["semantic_attention"] == original["derived"]["semantic_attention_per_stage"]
    assert (config["feature_size"], config["mask_feature_size"]) == (head["CONVS_DIM"], head["MASK_DIM"])
    for ours, theirs in [
        ("hidden_dim", "HIDDEN_DIM"),
        ("num_queries", "NUM_OBJECT_QUERIES"),
        ("num_attention_heads", "NHEADS"),
        ("dim_feedforward", "DIM_FEEDFORWARD"),
        ("decoder_layers", "DEC_LAYERS"),
        ("no_object_weight", "NO_OBJECT_WEIGHT"),
    ]:
        assert config[ours] == mask_former[theirs], ours


def test_the_converted_folder_runs_as_remote_code_in_the_pipeline(fixture, tmp_path):
    """Without semask importable: the folder's own code (FaPN decoder included) loads it and the pipeline segments."""
    _, _, converted = fixture
    write_remote_inputs(SemaskMask2FormerForUniversalSegmentation.from_pretrained(converted), converted)
    report = run_remote_script(converted, "remote", tmp_path)
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(
        "modeling_semask_mask2former.SemaskMask2FormerForUniversalSegmentation"
    )
    assert report["segments"] and all(segment["size"] == [70, 45] for segment in report["segments"])
