"""A converted original SeMask-MaskFormer checkpoint reproduces every tensor and loss of the original code."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_mask2former_auto import run_remote_script, write_remote_inputs

from conftest import assert_mask_classification_outputs_match
from semask import SemaskMaskFormerForInstanceSegmentation
from semask.conversion import main
from semask.inference import semantic_inference
from semask.modeling_semask_mask_classification import mask_classification_targets

FIXTURE = Path(__file__).parent / "fixtures" / "original_semask_maskformer" / "tiny"
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
NUM_AUX = 2  # DEC_LAYERS 3: the outputs of decoder layers 0 and 1 before the final one
LOSS_NAMES = (("loss_ce", "loss_cross_entropy"), ("loss_mask", "loss_mask"), ("loss_dice", "loss_dice"))


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURE / "io.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture checkpoint converted with the command line (NHEADS is not in the weights)."""
    output = tmp_path_factory.mktemp("converted") / "tiny-maskformer"
    arguments = ["--checkpoint", str(FIXTURE / "original_checkpoint.pth"), "--output", str(output)]
    assert main([*arguments, "--decoder-attention-heads", "4"]) == 0
    return output


@pytest.fixture(scope="module")
def model(converted):
    return SemaskMaskFormerForInstanceSegmentation.from_pretrained(converted)


def targets(expected: dict) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    labels = torch.stack([expected[f"target.{image}.seg_map"] for image in range(2)])
    mask_labels, class_labels = mask_classification_targets(labels)
    return labels, mask_labels, class_labels


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_model_reproduces_every_original_tensor(expected, converted, attn_implementation):
    model = SemaskMaskFormerForInstanceSegmentation.from_pretrained(converted, attn_implementation=attn_implementation)
    assert model.config.decoder_config._attn_implementation == attn_implementation
    assert model.config.backbone_config._attn_implementation == attn_implementation
    pixel_values = expected["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, output_auxiliary_logits=True)

    assert_mask_classification_outputs_match(outputs, expected, NUM_AUX, TOLERANCE)
    layer_outputs = model.model(pixel_values).transformer_decoder_intermediate_states
    torch.testing.assert_close(torch.stack(layer_outputs), expected["transformer_decoder.hidden_states"], **TOLERANCE)
    scores = semantic_inference(outputs.class_queries_logits, outputs.masks_queries_logits, pixel_values.shape[-2:])
    torch.testing.assert_close(scores, expected["semantic_segmentation"], **TOLERANCE)


def test_losses_and_matching_equal_the_original_on_its_outputs(expected, model):
    """MaskFormer's loss samples nothing: matching and every loss term follow from the original outputs."""
    labels, mask_labels, class_labels = targets(expected)
    for image in range(2):
        torch.testing.assert_close(mask_labels[image], expected[f"target.{image}.masks"].float(), rtol=0, atol=0)
        torch.testing.assert_close(class_labels[image], expected[f"target.{image}.labels"], rtol=0, atol=0)
    auxiliary = [
        {
            "class_queries_logits": expected[f"aux.{i}.pred_logits"],
            "masks_queries_logits": expected[f"aux.{i}.pred_masks"],
        }
        for i in range(NUM_AUX)
    ]
    predictions = (expected["pred_masks"], expected["pred_logits"])
    padded = [torch.nn.functional.pad(masks, (0, 128 - 101, 0, 96 - 75)) for masks in mask_labels]
    for name, logits in [("final", predictions), *((f"aux.{i}", tuple(auxiliary[i].values())[::-1]) for i in range(2))]:
        for image, (queries, targets_) in enumerate(model.criterion.matcher(*logits, padded, class_labels)):
            torch.testing.assert_close(queries, expected[f"match.{name}.{image}.query_index"], rtol=0, atol=0)
            torch.testing.assert_close(targets_, expected[f"match.{name}.{image}.target_index"], rtol=0, atol=0)

    raw = model.criterion(*predictions, padded, class_labels, auxiliary)
    weighted = model.loss_terms(*predictions, auxiliary, expected["sem_predictions"], labels=labels)
    padded_labels = torch.nn.functional.pad(labels, (0, 128 - 101, 0, 96 - 75), value=255)
    semantic = model.semantic_loss(expected["sem_predictions"], padded_labels)
    torch.testing.assert_close(semantic, expected["loss_raw.loss_cate"])
    for suffix in ["", *(f"_{index}" for index in range(NUM_AUX))]:
        for original, ours in LOSS_NAMES:
            torch.testing.assert_close(raw[ours + suffix], expected[f"loss_raw.{original}{suffix}"])
            torch.testing.assert_close(weighted[ours + suffix], expected[f"loss.{original}{suffix}"])
    torch.testing.assert_close(weighted["loss_semantic"], expected["loss.loss_cate"])
    torch.testing.assert_close(model.get_loss(weighted), expected["loss.total"])


def test_training_loss_of_the_converted_model_matches_the_original(expected, model):
    """End to end: the model's own outputs and targets from the (unpadded) label maps give the original total."""
    labels, _, _ = targets(expected)
    with torch.no_grad():
        loss = model(expected["pixel_values"], labels=labels).loss
    torch.testing.assert_close(loss, expected["loss.total"], **TOLERANCE)


def test_conversion_infers_the_fixture_configuration(converted):
    original = json.loads((FIXTURE / "original_config.json").read_text())
    swin, head, mask_former = (original["MODEL"][key] for key in ("SWIN", "SEM_SEG_HEAD", "MASK_FORMER"))
    config = json.loads((converted / "config.json").read_text())
    encoder, decoder = config["backbone_config"], config["decoder_config"]
    assert config["model_type"] == "semask_maskformer"
    for ours, theirs in [("embed_dim", "EMBED_DIM"), ("depths", "DEPTHS"), ("num_heads", "NUM_HEADS")]:
        assert encoder[ours] == swin[theirs]
    assert encoder["semantic_attention"] == original["derived"]["semantic_attention_per_stage"]
    assert encoder["semantic_window_size"] == swin["SEM_WINDOW_SIZE"]
    assert len(config["id2label"]) == len(encoder["id2label"]) == head["NUM_CLASSES"]
    assert (config["fpn_feature_size"], config["mask_feature_size"]) == (head["CONVS_DIM"], head["MASK_DIM"])
    for ours, theirs in [
        ("d_model", "HIDDEN_DIM"),
        ("num_queries", "NUM_OBJECT_QUERIES"),
        ("decoder_attention_heads", "NHEADS"),
        ("decoder_ffn_dim", "DIM_FEEDFORWARD"),
        ("decoder_layers", "DEC_LAYERS"),
        ("dropout", "DROPOUT"),
        ("attention_dropout", "DROPOUT"),
    ]:
        assert decoder[ours] == mask_former[theirs], ours
    for ours, theirs in [
        ("no_object_weight", "NO_OBJECT_WEIGHT"),
        ("mask_weight", "MASK_WEIGHT"),
        ("dice_weight", "DICE_WEIGHT"),
        ("semantic_loss_weight", "CATE_WEIGHT"),
        ("size_divisibility", "SIZE_DIVISIBILITY"),
        ("use_auxiliary_loss", "DEEP_SUPERVISION"),
    ]:
        assert config[ours] == mask_former[theirs], ours


def test_the_converted_folder_runs_as_remote_code_in_the_pipeline(converted, model, tmp_path):
    """Without semask importable: the folder's own code loads it and `pipeline("image-segmentation")` segments."""
    write_remote_inputs(model, converted)
    report = run_remote_script(converted, "remote", tmp_path, auto_class="AutoModelForInstanceSegmentation")
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(
        "modeling_semask_maskformer.SemaskMaskFormerForInstanceSegmentation"
    )
    assert report["segments"] and all(segment["size"] == [70, 45] for segment in report["segments"])
