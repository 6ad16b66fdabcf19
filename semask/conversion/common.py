"""What the SeMask-FPN, SeMask-MaskFormer and SeMask-Mask2Former converters share: reading original checkpoints
safely, the errors, the SeMask-Swin encoder (`backbone.*` keys: renames and the settings its weights fix), the
detectron2 heads' settings and the checks of the result."""

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from ..configuration_semask import settings_equal
from ..image_processing_semask import SemaskImageProcessor
from ..modelcard import is_mask_classification, preset_dataset
from ..presets import MASK2FORMER_PROCESSING

Model = TypeVar("Model", bound=PreTrainedModel)
# (original key pattern, semask key template), applied in order to every key.
KeyRenames = list[tuple[str, str | Callable[[re.Match], str]]]

ENCODER_KEY_PREFIX = "backbone."
# The encoder's renames, to key names inside `SemaskModel`; the fused `qkv` projection is split separately.
ENCODER_KEY_RENAMES: KeyRenames = [
    (r"backbone\.patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"backbone\.patch_embed\.norm\.", "embeddings.norm."),
    (r"backbone\.absolute_pos_embed$", "embeddings.position_embeddings"),
    (r"backbone\.norm(\d+)\.", lambda m: f"hidden_states_norms.stage{int(m.group(1)) + 1}."),
    (r"backbone\.layers\.", "encoder.layers."),
    (r"\.semantic_layer\.norm1\.", ".semantic_layer.layernorm."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.proj\.", ".attention.o_proj."),
    (r"\.attn\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.class_injection\.", ".blocks."),
    (r"\.mlp_cls_q\.", ".q_proj."),
    (r"\.mlp_cls_k\.", ".k_proj."),
    (r"\.mlp_v\.", ".v_proj."),
    (r"\.mlp_res\.", ".o_proj."),
]
# Buffers the original saves that semask rebuilds from the config.
DROPPED_KEYS = re.compile(r"\.attn\.relative_position_index$")
QKV_KEY = re.compile(r"(.*)\.attn\.qkv\.(weight|bias)$")
LISTED_KEYS = 5  # keys named in the non-finite weights error
NO_OBJECT_WEIGHT_KEY = "criterion.empty_weight"  # detectron2 checkpoints' loss buffer


class ConversionError(ValueError):
    """An input the converter cannot use (checkpoint file, weights); `semask-convert` prints it as is."""


class CheckpointMismatchError(ConversionError):
    """The checkpoint's weights do not fit the SeMask model described by its configuration."""


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an original checkpoint without unpickling code.

    Args:
        path (`str` or `Path`):
            A ``{'state_dict': ...}`` (mmsegmentation), ``{'model': ...}`` (detectron2) or bare state dict file.

    Returns:
        `dict[str, torch.Tensor]`: the original state dict.

    Raises:
        `FileNotFoundError` for a missing file, `ConversionError` for an unreadable one or one holding code,
        `CheckpointMismatchError` for a checkpoint without SeMask encoder weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses anything but tensors and plain containers
        raise ConversionError(
            f"Cannot read checkpoint {path}: it holds pickled objects other than weights (possibly code), which are "
            "never loaded; save the state dict alone."
        ) from error
    except Exception as error:  # torch.load fails with many types (EOFError, KeyError, RuntimeError, ...) on bad files
        detail = str(error).split(". ")[0]
        raise ConversionError(
            f"Cannot read checkpoint {path}: not a PyTorch checkpoint, or truncated "
            f"({type(error).__name__}{': ' + detail if detail else ''})"
        ) from error
    state_dict = None
    if isinstance(checkpoint, dict):
        state_dict = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state_dict, dict) or not any(key.startswith(ENCODER_KEY_PREFIX) for key in state_dict):
        raise CheckpointMismatchError(
            f"{path} is not an original SeMask-FPN checkpoint (a state dict with `backbone.*` and `decode_head.*` "
            "keys, or a dict holding one under 'state_dict') nor a SeMask-MaskFormer / SeMask-Mask2Former one "
            "(`backbone.*` and `sem_seg_head.*` keys, under 'model')."
        )
    return state_dict


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """Raise `ConversionError` naming the (first few) keys whose weights hold NaN or infinite values."""
    bad = [
        key
        for key, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not value.is_meta
        and not torch.isfinite(value).all()
    ]
    if bad:
        names = ", ".join(bad[:LISTED_KEYS]) + (", ..." if len(bad) > LISTED_KEYS else "")
        raise ConversionError(f"The checkpoint has NaN or infinite weights in {len(bad)} tensor(s): {names}")


def require_key(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The weight under `key`; `CheckpointMismatchError` when the checkpoint lacks it."""
    if key not in state_dict:
        raise CheckpointMismatchError(
            f"The checkpoint lacks `{key}`, which every original SeMask checkpoint of its kind has."
        )
    return state_dict[key]


def key_indices(state_dict: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """The sorted distinct integers that the first group of `pattern` matches at the start of the keys."""
    return sorted({int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))})


def rename_key(key: str, renames: KeyRenames) -> str:
    """`key` with every rename of `renames` applied in order."""
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


def split_fused_projection(prefix: str, kind: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """The q / k / v parts (`{prefix}q_proj.{kind}`, ...) of a fused input projection's weight or bias."""
    return {
        f"{prefix}{name}.{kind}": part.clone() for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3))
    }


def renamed_head_weight(
    key: str, value: torch.Tensor, renames: KeyRenames, fused_projection: re.Pattern
) -> dict[str, torch.Tensor]:
    """A head weight under its semask name (`renames` applied), a fused attention `in_proj` (its renamed key matching
    `fused_projection`, whose groups are the attention's prefix and "weight" / "bias") split into q / k / v."""
    key = rename_key(key, renames)
    if in_proj := fused_projection.match(key):
        return split_fused_projection(f"{in_proj[1]}.", in_proj[2], value)
    return {key: value}


def convert_encoder_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The original encoder weights (`backbone.*` keys) renamed for a `SemaskModel` whose keys start with `prefix`.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            An original state dict; keys outside the encoder are left out.
        prefix (`str`):
            Where the encoder sits in the semask model, e.g. ``"semask."``.

    Returns:
        `dict[str, torch.Tensor]`: the renamed weights, each fused `qkv` projection split into q / k / v and the
        absolute position embedding (if any) flattened to (1, h * w, C).
    """
    converted = {}
    for key, value in state_dict.items():
        if not key.startswith(ENCODER_KEY_PREFIX) or DROPPED_KEYS.search(key):
            continue
        if qkv := QKV_KEY.match(key):
            layer, kind = qkv.groups()
            layer = prefix + rename_key(f"{layer}.attention.", ENCODER_KEY_RENAMES)
            converted |= split_fused_projection(layer, kind, value)
            continue
        if key == "backbone.absolute_pos_embed":
            value = value.flatten(2).transpose(1, 2)
        converted[prefix + rename_key(key, ENCODER_KEY_RENAMES)] = value
    return converted


def infer_encoder_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskConfig` encoder arguments that the original `backbone.*` weights determine (no label set)."""
    projection = require_key(state_dict, "backbone.patch_embed.proj.weight")
    embed_dim, num_channels, patch_size = projection.shape[0], projection.shape[1], projection.shape[2]
    stages = key_indices(state_dict, r"backbone\.layers\.(\d+)\.")
    depths = [len(key_indices(state_dict, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.")) for i in stages]
    tables = [
        require_key(state_dict, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in stages
    ]
    mlp_hidden = require_key(state_dict, "backbone.layers.0.blocks.0.mlp.fc1.weight").shape[0]
    semantic_blocks = [
        len(key_indices(state_dict, rf"backbone\.layers\.{i}\.semantic_layer\.class_injection\.(\d+)\."))
        for i in stages
    ]
    kwargs = {
        "embed_dim": embed_dim,
        "num_channels": num_channels,
        "patch_size": patch_size,
        "depths": depths,
        "num_heads": [table.shape[1] for table in tables],
        "window_size": (round(tables[0].shape[0] ** 0.5) + 1) // 2,
        "mlp_ratio": mlp_hidden / embed_dim,
        "qkv_bias": "backbone.layers.0.blocks.0.attn.qkv.bias" in state_dict,
        "patch_norm": "backbone.patch_embed.norm.weight" in state_dict,
        "use_absolute_embeddings": "backbone.absolute_pos_embed" in state_dict,
        "num_semantic_blocks": semantic_blocks,
    }
    if kwargs["use_absolute_embeddings"]:
        kwargs["image_size"] = state_dict["backbone.absolute_pos_embed"].shape[-1] * patch_size
    return kwargs


def check_label_count(state_dict: dict[str, torch.Tensor], num_labels: int, head: str) -> None:
    """Raise `CheckpointMismatchError` unless the semantic layers (if any) predict the head's `num_labels` classes."""
    prior_key = "backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight"
    if prior_key in state_dict and state_dict[prior_key].shape[0] != num_labels:
        raise CheckpointMismatchError(
            f"The semantic layers predict {state_dict[prior_key].shape[0]} classes but the {head} {num_labels}; "
            "semask needs one label set for both."
        )


def raise_on_contradictions(chosen: dict, inferred: dict, num_labels: int) -> None:
    """Raise `CheckpointMismatchError` where chosen settings contradict those inferred from the weights.

    Args:
        chosen (`dict`):
            Config arguments from the preset and the user's overrides (an `id2label` must name `num_labels` classes).
        inferred (`dict`):
            Config arguments the weights determine.
        num_labels (`int`):
            The checkpoint's class count.
    """
    contradictions = {
        key: (value, inferred[key])
        for key, value in chosen.items()
        if key in inferred and not settings_equal(value, inferred[key])
    }
    if "id2label" in chosen and len(chosen["id2label"]) != num_labels:
        contradictions["num_labels"] = (len(chosen["id2label"]), num_labels)
    if contradictions:
        details = ", ".join(
            f"{key}: given {given}, checkpoint {found}" for key, (given, found) in contradictions.items()
        )
        raise CheckpointMismatchError(f"The checkpoint does not match the requested configuration ({details}).")


def detectron2_config_kwargs(
    state_dict: dict[str, torch.Tensor], head: dict, chosen: dict, overrides: dict, encoder_settings: set[str]
) -> dict:
    """The config arguments for an original detectron2 (SeMask-MaskFormer / -Mask2Former) checkpoint: the settings
    its weights fix, then the preset's, then `overrides`; every contradiction with the weights is listed at once.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original state dict.
        head (`dict`):
            The settings the head's weights fix, with its `num_labels` (the no-object weight is read here).
        chosen (`dict`):
            The preset's config arguments (empty without a preset).
        overrides (`dict`):
            The user's; those named in `encoder_settings` go to the encoder.
        encoder_settings (`set[str]`):
            The `SemaskConfig` settings that are not the model config's own.
    """
    head = dict(head)
    num_labels = head.pop("num_labels")
    if NO_OBJECT_WEIGHT_KEY in state_dict:  # float32 -> the decimal it was written as
        head["no_object_weight"] = float(f"{state_dict[NO_OBJECT_WEIGHT_KEY][-1].item():.7g}")
    check_label_count(state_dict, num_labels, "class predictor")
    encoder = infer_encoder_kwargs(state_dict)
    chosen = dict(chosen)
    chosen_encoder = chosen.pop("backbone_config", {})
    chosen_encoder |= {key: value for key, value in overrides.items() if key in encoder_settings}
    chosen |= {key: value for key, value in overrides.items() if key not in encoder_settings}
    raise_on_contradictions({**chosen, **chosen_encoder}, {**head, **encoder}, num_labels)
    id2label = chosen.pop("id2label", {index: f"LABEL_{index}" for index in range(num_labels)})
    backbone = {"semantic_window_size": 7, **chosen_encoder, **encoder}
    return {**chosen, **head, "backbone_config": backbone, "id2label": id2label}


def load_with_loss_buffer(model: Model, converted: dict[str, torch.Tensor]) -> Model:
    """`load_converted` for a mask classification model, whose loss buffer (`criterion.empty_weight`) follows its
    `no_object_weight` (inferred from that buffer); without scipy the model has no loss module."""
    converted.pop(NO_OBJECT_WEIGHT_KEY, None)
    if model.criterion is not None:
        converted[NO_OBJECT_WEIGHT_KEY] = model.criterion.empty_weight
    return load_converted(model, converted)


def check_state_dict(converted: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise `CheckpointMismatchError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    misshaped = sorted(
        f"{key}: checkpoint {tuple(converted[key].shape)}, model {tuple(expected[key].shape)}"
        for key in set(expected) & set(converted)
        if converted[key].shape != expected[key].shape
    )
    problems = [
        (title, keys)
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        lines = [f"{len(keys)} {title} key(s):\n  " + "\n  ".join(keys) for title, keys in problems]
        raise CheckpointMismatchError("The checkpoint does not match the SeMask model:\n" + "\n".join(lines))


def load_converted(model: Model, converted: dict[str, torch.Tensor]) -> Model:
    """`model` in eval mode holding exactly the `converted` weights (`check_state_dict` first)."""
    check_state_dict(converted, model)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def original_test_processor(config: PreTrainedConfig, preset: str | None) -> SemaskImageProcessor:
    """The original test pipeline of the preset's dataset (without a preset: ADE20K's) for the model's kind.

    Args:
        config (`PreTrainedConfig`):
            A `SemaskConfig` (SeMask-FPN), `SemaskMask2FormerConfig` or `SemaskMaskFormerConfig`.
        preset (`str`, *optional*):
            The released model's preset, whose dataset fixes the pipeline.
    """
    dataset = preset_dataset(preset) if preset else None
    if is_mask_classification(config):
        return SemaskImageProcessor(**MASK2FORMER_PROCESSING[dataset or "ade20k"])
    return SemaskImageProcessor.from_dataset(dataset) if dataset else SemaskImageProcessor()
