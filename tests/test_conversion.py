"""The converter: safe loading, clear failures that write nothing, presets and overrides."""

import json

import pytest
import torch

from conftest import fpn_fixture_dir, tiny_config_kwargs
from semask.conversion import (
    CheckpointMismatchError,
    ConversionError,
    convert_checkpoint_file,
    load_original_state_dict,
    main,
)
from semask.conversion.fpn import config_from_original, convert_state_dict


@pytest.fixture(scope="module")
def original_state_dict():
    return load_original_state_dict(fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth")


def save_checkpoint(state_dict, path, wrap=True):
    torch.save({"meta": {}, "state_dict": state_dict} if wrap else state_dict, path)
    return path


def test_bare_state_dict_converts_like_a_wrapped_one(original_state_dict, tmp_path):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "bare.pth", wrap=False)
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop("backbone.layers.1.semantic_layer.class_injection.0.gamma"), "1 missing key"),
        (lambda sd: sd.update({"decode_head.extra.weight": torch.zeros(1)}), "1 unexpected key"),
        (
            lambda sd: sd.update({"backbone.norm2.weight": torch.zeros(7)}),
            "1 mis-shaped key(s):\n  semask.hidden_states_norms.stage3.weight: checkpoint (7,), model (128,)",
        ),
    ],
)
def test_mismatched_checkpoint_fails_listing_keys_and_writes_nothing(
    original_state_dict, tmp_path, capsys, edit, expected
):
    state_dict = dict(original_state_dict)
    edit(state_dict)
    assert_conversion_refused(save_checkpoint(state_dict, tmp_path / "broken.pth"), capsys, expected)


def assert_conversion_refused(checkpoint, capsys, expected: str) -> None:
    """`semask-convert` exits 1 naming `expected` and writes nothing next to `checkpoint` (no staging folder)."""
    assert main(["--checkpoint", str(checkpoint), "--output", str(checkpoint.parent / "out")]) == 1
    assert expected in capsys.readouterr().err
    assert [path.name for path in checkpoint.parent.iterdir()] == [checkpoint.name]


def test_missing_key_names_the_original_key(original_state_dict, tmp_path, capsys):
    state_dict = {k: v for k, v in original_state_dict.items() if k != "decode_head.scale_heads.2.2.bn.running_var"}
    checkpoint = save_checkpoint(state_dict, tmp_path / "broken.pth")
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    assert "decode_head.scale_heads.2.2.batch_norm.running_var" in capsys.readouterr().err


def test_not_a_semask_checkpoint(tmp_path, capsys):
    checkpoint = save_checkpoint({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 1
    assert "not an original SeMask-FPN checkpoint" in capsys.readouterr().err


def test_missing_checkpoint_file(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--output", str(tmp_path / "out")]) == 1
    assert "Checkpoint not found" in capsys.readouterr().err


def test_pickled_code_is_refused(tmp_path):
    checkpoint = tmp_path / "code.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "meta": {"hook": print}}, checkpoint)
    with pytest.raises(ConversionError, match="holds pickled objects other than weights"):
        load_original_state_dict(checkpoint)


def test_existing_output_is_never_overwritten(original_state_dict, tmp_path, capsys):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    output = tmp_path / "out"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    assert main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert [path.name for path in output.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint_file(checkpoint, empty)
    assert (empty / "config.json").is_file()


def test_overrides_and_labels_file(original_state_dict, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"class {i}" for i in range(10)]))
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    output = tmp_path / "out"
    arguments = ["--checkpoint", str(checkpoint), "--output", str(output), "--labels", str(labels)]
    arguments += ["--semantic-attention", "windowed,windowed,windowed,global", "--semantic-window-size", "5"]
    assert main(arguments) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"]["3"] == "class 3"
    assert config["semantic_attention"] == ["windowed", "windowed", "windowed", "global"]
    assert config["semantic_window_size"] == 5


def test_preset_that_contradicts_the_weights_is_refused(original_state_dict):
    with pytest.raises(CheckpointMismatchError, match="embed_dim: given 96, checkpoint 32"):
        config_from_original(original_state_dict, "semask-tiny-fpn-ade20k")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"id2label": {0: "a", 1: "b", 2: "c"}}, "num_labels: given 3, checkpoint 10"),
        ({"window_size": 5, "semantic_attention": ["global"] * 4}, "window_size: given 5, checkpoint 7"),
    ],
)
def test_overrides_that_contradict_the_weights_are_refused(original_state_dict, overrides, expected):
    with pytest.raises(CheckpointMismatchError, match=expected):
        config_from_original(original_state_dict, **overrides)


def architecture_keys(embed_dim, depths, heads, window, num_labels, mlp_ratio=4):
    """The original keys that fix a SeMask-FPN architecture, as meta tensors (enough for config inference)."""
    meta = {"device": "meta"}
    state_dict = {
        "backbone.patch_embed.proj.weight": torch.empty(embed_dim, 3, 4, 4, **meta),
        "backbone.patch_embed.norm.weight": torch.empty(embed_dim, **meta),
        "decode_head.conv_seg.weight": torch.empty(num_labels, 256, 1, 1, **meta),
    }
    for stage, (depth, num_heads) in enumerate(zip(depths, heads, strict=True)):
        dim = embed_dim * 2**stage
        for block in range(depth):
            prefix = f"backbone.layers.{stage}.blocks.{block}."
            state_dict[prefix + "attn.relative_position_bias_table"] = torch.empty(
                (2 * window - 1) ** 2, num_heads, **meta
            )
            state_dict[prefix + "attn.qkv.bias"] = torch.empty(3 * dim, **meta)
            state_dict[prefix + "mlp.fc1.weight"] = torch.empty(mlp_ratio * dim, dim, **meta)
        semantic = f"backbone.layers.{stage}.semantic_layer.class_injection.0."
        state_dict[semantic + "mlp_cls_q.weight"] = torch.empty(num_labels, dim, **meta)
    return state_dict


@pytest.mark.parametrize(
    ("preset", "architecture", "semantic_attention"),
    [
        (
            "semask-small-fpn-coco-stuff10k",
            (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 171),
            ["windowed"] * 2 + ["global"] * 2,
        ),
        ("semask-base-fpn-ade20k", (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 150), ["windowed"] * 4),
        ("semask-large-fpn-cityscapes", (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 19), ["windowed"] * 4),
    ],
)
def test_released_architectures_are_inferred_and_named_by_their_preset(preset, architecture, semantic_attention):
    state_dict = architecture_keys(*architecture)
    config = config_from_original(state_dict, preset)
    embed_dim, depths, heads, window, num_labels = architecture
    assert (config.embed_dim, list(config.depths), list(config.num_heads)) == (embed_dim, list(depths), list(heads))
    assert config.window_size == config.semantic_window_size == window
    assert config.num_labels == num_labels and config.decoder_hidden_size == 256 and config.mlp_ratio == 4
    assert list(config.semantic_attention) == semantic_attention
    assert config.id2label[0] in ("person", "wall", "road")
    # without a preset the original's rules give the same semantic settings, with placeholder names
    plain = config_from_original(state_dict)
    assert list(plain.semantic_attention) == semantic_attention and plain.id2label[0] == "LABEL_0"


def test_prior_and_head_class_counts_must_agree():
    state_dict = architecture_keys(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 171)
    state_dict["backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight"] = torch.empty(
        150, 96, device="meta"
    )
    with pytest.raises(CheckpointMismatchError, match="semantic layers predict 150 classes but the decode head 171"):
        config_from_original(state_dict)


def test_absolute_position_embedding_keeps_the_original_resize():
    """The original stores (1, C, h, w) and resizes it bicubically to every patch grid; so does semask."""
    from semask import SemaskConfig, SemaskModel

    original = torch.randn(1, 16, 8, 8)
    converted = convert_state_dict({"backbone.absolute_pos_embed": original})
    model = SemaskModel(SemaskConfig(**tiny_config_kwargs(use_absolute_embeddings=True, image_size=32)))
    model.embeddings.position_embeddings.data.copy_(converted["semask.embeddings.position_embeddings"])
    for size in [(8, 8), (11, 6)]:
        expected = torch.nn.functional.interpolate(original, size=size, mode="bicubic").flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.embeddings.resized_position_embeddings(size), expected)
    assert model(torch.randn(1, 3, 43, 22)).feature_maps[0].shape == (1, 16, 11, 6)
