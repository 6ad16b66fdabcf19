"""SeMask-Mask2Former conversion: clear failures that write nothing, presets, released architectures, the folder."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from test_conversion import architecture_keys, assert_conversion_refused

from conftest import fpn_fixture_dir, mask2former_fixture_dir
from semask import SemaskMask2FormerConfig
from semask.conversion import CheckpointMismatchError, convert_checkpoint_file, load_original_state_dict, main
from semask.conversion.mask2former import config_from_original
from semask.modelcard import preset_mismatches, write_model_card

CHECKPOINT_KEY = "model"  # detectron2 checkpoints hold their weights under 'model'


@pytest.fixture(scope="module")
def original_state_dict():
    return load_original_state_dict(mask2former_fixture_dir("tiny-ade") / "original_checkpoint.pth")


def save_checkpoint(state_dict, path):
    torch.save({CHECKPOINT_KEY: state_dict}, path)
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda sd: sd.pop("sem_seg_head.predictor.decoder_norm.bias"),
            "model.transformer_module.decoder.layernorm.bias",
        ),
        (
            lambda sd: sd.update({"sem_seg_head.predictor.extra.weight": torch.zeros(1)}),
            "1 unexpected key(s):\n  sem_seg_head.predictor.extra.weight",
        ),
        (
            lambda sd: sd.update({"sem_seg_head.pixel_decoder.layer_1.norm.weight": torch.zeros(7)}),
            "model.pixel_level_module.decoder.layer_1.1.weight: checkpoint (7,), model (32,)",
        ),
    ],
)
def test_mismatched_checkpoint_fails_listing_keys_and_writes_nothing(
    original_state_dict, tmp_path, capsys, edit, expected
):
    state_dict = dict(original_state_dict)
    edit(state_dict)
    assert_conversion_refused(save_checkpoint(state_dict, tmp_path / "broken.pth"), capsys, expected)


def test_presets_of_the_other_kind_are_refused(original_state_dict, tmp_path, capsys):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "mask2former.pth")
    arguments = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "a"), "--preset", "semask-tiny-fpn-ade20k"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "semask-tiny-fpn-ade20k is a SeMask-FPN preset but this is a SeMask-Mask2Former checkpoint" in error
    assert "(it has sem_seg_head.predictor." in error and not (tmp_path / "a").exists()
    fpn = fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth"
    arguments = [
        "--checkpoint",
        str(fpn),
        "--output",
        str(tmp_path / "b"),
        "--preset",
        "semask-large-mask2former-ade20k",
    ]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert "is a SeMask-Mask2Former preset but this is a SeMask-FPN checkpoint (it has decode_head." in error
    assert not (tmp_path / "b").exists()
    with pytest.raises(CheckpointMismatchError, match="embed_dim: given 192, checkpoint 32"):
        config_from_original(original_state_dict, "semask-large-mask2former-ade20k")


def test_overrides_reach_the_encoder_and_the_output_folder_is_complete(original_state_dict, tmp_path):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    output = tmp_path / "out"
    arguments = [
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
        "--semantic-attention",
        "global,global,global,global",
    ]
    assert main([*arguments, "--semantic-window-size", "5"]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "semask_mask2former"
    assert config["backbone_config"]["semantic_attention"] == ["global"] * 4
    assert config["backbone_config"]["semantic_window_size"] == 5
    processor = json.loads((output / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 640, "longest_edge": 2560} and processor["do_reduce_labels"]
    card = ModelCard.load(output / "README.md")
    assert "SeMask-Mask2Former" in card.text and "semantic inference scores (no softmax" in card.text


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"id2label": {0: "a"}}, "num_labels: given 1, checkpoint 150"),
        ({"embed_dim": 64, "semantic_attention": ["global"] * 4}, "embed_dim: given 64, checkpoint 32"),
        ({"num_queries": 7}, "num_queries: given 7, checkpoint"),
    ],
)
def test_overrides_that_contradict_the_weights_are_refused(original_state_dict, overrides, expected):
    with pytest.raises(CheckpointMismatchError, match=expected):
        config_from_original(original_state_dict, **overrides)


def mask2former_architecture_keys(num_labels: int, encoder_layers=6, decoder_layers=10, width=256, queries=100):
    """The original keys that fix a SeMask-L Mask2Former architecture, as meta tensors."""
    meta = {"device": "meta"}
    state_dict = architecture_keys(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, num_labels)
    del state_dict["decode_head.conv_seg.weight"]
    decoder, predictor = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    state_dict[decoder + "mask_features.weight"] = torch.empty(width, width, 1, 1, **meta)
    state_dict[decoder + "adapter_1.weight"] = torch.empty(width, 192, 1, 1, **meta)
    for layer in range(encoder_layers):
        prefix = f"{decoder}transformer.encoder.layers.{layer}."
        state_dict[prefix + "self_attn.sampling_offsets.weight"] = torch.empty(8 * 3 * 4 * 2, width, **meta)
        state_dict[prefix + "linear1.weight"] = torch.empty(1024, width, **meta)
    for layer in range(decoder_layers - 1):
        state_dict[f"{predictor}transformer_ffn_layers.{layer}.linear1.weight"] = torch.empty(2048, width, **meta)
    state_dict[predictor + "query_feat.weight"] = torch.empty(queries, width, **meta)
    state_dict[predictor + "class_embed.weight"] = torch.empty(num_labels + 1, width, **meta)
    state_dict["criterion.empty_weight"] = torch.tensor([1.0] * num_labels + [0.1])
    return state_dict


@pytest.mark.parametrize(
    ("preset", "num_labels", "semantic_window", "semantic_attention"),
    [
        ("semask-large-mask2former-ade20k", 150, 12, ["windowed"] * 3 + ["global"]),
        ("semask-large-mask2former-cityscapes", 19, 7, ["windowed"] * 4),
    ],
)
def test_released_architectures_are_inferred_and_named_by_their_preset(
    preset, num_labels, semantic_window, semantic_attention
):
    state_dict = mask2former_architecture_keys(num_labels)
    config = config_from_original(state_dict, preset)
    assert preset_mismatches(config, preset) == []
    assert config.to_diff_dict() == SemaskMask2FormerConfig.from_preset(preset).to_diff_dict()
    assert config.backbone_config.semantic_window_size == semantic_window
    # without a preset the original's rules give the same semantic attention, with its default window 7
    plain = config_from_original(state_dict)
    assert list(plain.backbone_config.semantic_attention) == semantic_attention
    assert plain.backbone_config.semantic_window_size == 7 and plain.id2label[0] == "LABEL_0"


def test_model_card_of_a_released_model(tmp_path):
    preset = "semask-large-mask2former-cityscapes"
    text = ModelCard.load(write_model_card(tmp_path, SemaskMask2FormerConfig.from_preset(preset), preset=preset)).text
    assert "| semask-large-mask2former-cityscapes | Cityscapes | 83.97 | 84.98 |" in text
    assert "SeMask-Mask2Former (Swin-L)" in text and "100 queries, 9 layers" in text
    assert "Parameters: 221.8M" in text  # the original README: 222M
    assert "shortest_edge" not in text and "fit 2048x1024" in text


def test_existing_output_is_never_overwritten(original_state_dict, tmp_path):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        convert_checkpoint_file(checkpoint, output)
    assert [path.name for path in output.iterdir()] == ["mine.txt"]
