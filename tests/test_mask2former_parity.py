"""A converted original SeMask-Mask2Former checkpoint reproduces every tensor and loss of the original code."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_mask_classification_outputs_match, mask2former_fixture_dir
from semask import SemaskMask2FormerForUniversalSegmentation
from semask.conversion import main
from semask.inference import semantic_inference
from semask.modeling_semask_mask_classification import mask_classification_targets

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NUM_AUX = 4  # DEC_LAYERS 5: the learnable queries' prediction and 4 decoder layers before the final one
# The loss settings the weights do not fix (fixture README, original_config.json): 64 sampled points.
LOSS_SETTINGS = {"train_num_points": 64}


@pytest.fixture(scope="module")
def fixture():
    folder = mask2former_fixture_dir("tiny-ade")
    return folder, load_file(folder / "io.safetensors")


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    """The fixture checkpoint converted with the command-line entry point (which recognises its kind)."""
    folder, _ = fixture
    output = tmp_path_factory.mktemp("converted") / "tiny-ade"
    assert main(["--checkpoint", str(folder / "original_checkpoint.pth"), "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def model(converted):
    return SemaskMask2FormerForUniversalSegmentation.from_pretrained(converted, **LOSS_SETTINGS)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_model_reproduces_every_original_tensor(fixture, converted, attn_implementation):
    _, expected = fixture
    model = SemaskMask2FormerForUniversalSegmentation.from_pretrained(
        converted, attn_implementation=attn_implementation
    )
    assert model.config.backbone_config._attn_implementation == attn_implementation
    assert not model.training
    pixel_values = expected["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, output_auxiliary_logits=True)

    assert_mask_classification_outputs_match(outputs, expected, NUM_AUX, TOLERANCE)
    for index in range(3):
        actual = outputs.pixel_decoder_hidden_states[index]
        torch.testing.assert_close(actual, expected[f"multi_scale_features.{index}"], **TOLERANCE)
    scores = semantic_inference(outputs.class_queries_logits, outputs.masks_queries_logits, pixel_values.shape[-2:])
    torch.testing.assert_close(scores[0], expected["semantic_segmentation"], **TOLERANCE)


def test_semantic_loss_and_sampled_losses_match_under_the_recorded_seed(fixture, model):
    """loss_cate is deterministic; the others match exactly given the original outputs and torch.manual_seed(2024)."""
    _, expected = fixture
    labels = expected["target.seg_map"][None]
    mask_labels, class_labels = mask_classification_targets(labels)
    torch.testing.assert_close(mask_labels[0], expected["target.masks"].float(), rtol=0, atol=0)
    torch.testing.assert_close(class_labels[0], expected["target.labels"], rtol=0, atol=0)
    auxiliary = [
        {
            "class_queries_logits": expected[f"aux.{i}.pred_logits"],
            "masks_queries_logits": expected[f"aux.{i}.pred_masks"],
        }
        for i in range(NUM_AUX)
    ]
    predictions = (expected["pred_masks"], expected["pred_logits"])

    torch.manual_seed(2024)
    final_match = model.criterion.matcher(*predictions, mask_labels, class_labels)[0]
    torch.manual_seed(2024)
    raw = model.criterion(*predictions, mask_labels, class_labels, auxiliary)
    torch.manual_seed(2024)
    weighted = model.loss_terms(*predictions, auxiliary, expected["sem_predictions"], labels=labels)

    torch.testing.assert_close(final_match[0], expected["match.final.query_index"], rtol=0, atol=0)
    torch.testing.assert_close(final_match[1], expected["match.final.target_index"], rtol=0, atol=0)
    torch.testing.assert_close(model.semantic_loss(expected["sem_predictions"], labels), expected["loss_raw.loss_cate"])
    for suffix in ["", *(f"_{index}" for index in range(NUM_AUX))]:
        for original, ours in (
            ("loss_ce", "loss_cross_entropy"),
            ("loss_mask", "loss_mask"),
            ("loss_dice", "loss_dice"),
        ):
            torch.testing.assert_close(raw[ours + suffix], expected[f"loss_raw.{original}{suffix}"])
            torch.testing.assert_close(weighted[ours + suffix], expected[f"loss.{original}{suffix}"])
    torch.testing.assert_close(weighted["loss_semantic"], expected["loss.loss_cate"])
    torch.testing.assert_close(model.get_loss(weighted), expected["loss.total"])


def test_training_loss_of_the_converted_model_matches_the_original(fixture, model):
    """End to end: the model's own outputs and targets from the label map give the original's total loss."""
    _, expected = fixture
    torch.manual_seed(2024)
    with torch.no_grad():
        loss = model(expected["pixel_values"], labels=expected["target.seg_map"][None]).loss
    torch.testing.assert_close(loss, expected["loss.total"], atol=1e-3, rtol=1e-4)


def test_conversion_infers_the_fixture_configuration(fixture, converted):
    folder, _ = fixture
    original = json.loads((folder / "original_config.json").read_text())
    swin, head, mask_former = (original["MODEL"][key] for key in ("SWIN", "SEM_SEG_HEAD", "MASK_FORMER"))
    config = json.loads((converted / "config.json").read_text())
    encoder = config["backbone_config"]
    for ours, theirs in [("embed_dim", "EMBED_DIM"), ("depths", "DEPTHS"), ("num_heads", "NUM_HEADS")]:
        assert encoder[ours] == swin[theirs]
    assert encoder["window_size"] == swin["WINDOW_SIZE"] and encoder["semantic_window_size"] == swin["SEM_WINDOW_SIZE"]
    assert encoder["semantic_attention"] == original["derived"]["semantic_attention_per_stage"]
    assert encoder["mlp_ratio"] == swin["MLP_RATIO"] and encoder["num_semantic_blocks"] == [swin["NUM_SEM_BLOCKS"]] * 4
    assert len(config["id2label"]) == len(encoder["id2label"]) == head["NUM_CLASSES"]
    assert (config["feature_size"], config["mask_feature_size"]) == (head["CONVS_DIM"], head["MASK_DIM"])
    assert config["encoder_layers"] == head["TRANSFORMER_ENC_LAYERS"]
    assert config["encoder_feedforward_dim"] == original["derived"]["pixel_decoder_transformer_dim_feedforward"]
    assert config["common_stride"] == head["COMMON_STRIDE"]
    for ours, theirs in [
        ("hidden_dim", "HIDDEN_DIM"),
        ("num_queries", "NUM_OBJECT_QUERIES"),
        ("num_attention_heads", "NHEADS"),
        ("dim_feedforward", "DIM_FEEDFORWARD"),
        ("decoder_layers", "DEC_LAYERS"),
        ("no_object_weight", "NO_OBJECT_WEIGHT"),
        ("class_weight", "CLASS_WEIGHT"),
        ("mask_weight", "MASK_WEIGHT"),
        ("dice_weight", "DICE_WEIGHT"),
        ("semantic_loss_weight", "CATE_WEIGHT"),
        ("size_divisibility", "SIZE_DIVISIBILITY"),
        ("enforce_input_projection", "ENFORCE_INPUT_PROJ"),
        ("pre_norm", "PRE_NORM"),
    ]:
        assert config[ours] == mask_former[theirs], ours
