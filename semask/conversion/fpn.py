"""Conversion of original SeMask-FPN (mmsegmentation 0.x) checkpoints to `SemaskForSemanticSegmentation`.

The weights fix the Swin architecture, the class count, the semantic blocks per stage and the decoder width. What
they do not fix comes from the preset, from the overrides, or from the original's rules: the semantic window equals
the Swin window, and `SemaskConfig` applies the original's semantic-attention rule
(`semask.presets.fpn_semantic_attention`) unless `semantic_attention` is given.
"""

import torch

from ..configuration_semask import SemaskConfig
from ..modeling_semask import SemaskForSemanticSegmentation
from ..presets import fpn_preset
from .common import (
    ENCODER_KEY_PREFIX,
    KeyRenames,
    check_label_count,
    convert_encoder_state_dict,
    infer_encoder_kwargs,
    load_converted,
    raise_on_contradictions,
    rename_key,
    require_key,
)

HEAD_KEY_RENAMES: KeyRenames = [
    (r"(decode_head\.scale_heads\.\d+\.\d+)\.bn\.", r"\1.batch_norm."),
    (r"decode_head\.conv_seg\.", "decode_head.classifier."),
]


def infer_config_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskConfig` arguments that the original SeMask-FPN weights determine."""
    classifier = require_key(state_dict, "decode_head.conv_seg.weight")
    check_label_count(state_dict, classifier.shape[0], "decode head")
    return {
        **infer_encoder_kwargs(state_dict),
        "decoder_hidden_size": classifier.shape[1],
        "num_labels": classifier.shape[0],
    }


def config_from_original(state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides) -> SemaskConfig:
    """A `SemaskConfig` for an original SeMask-FPN checkpoint: inferred from the weights, then the preset, then
    `overrides`.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original state dict (meta tensors suffice).
        preset (`str`, *optional*):
            A SeMask-FPN preset, e.g. ``"semask-tiny-fpn-ade20k"``: label names and semantic settings.
        overrides (`dict`, *optional*):
            `SemaskConfig` arguments over the preset's, e.g. `id2label` or `semantic_attention`.

    Raises:
        `CheckpointMismatchError`: a preset or override that contradicts the weights.
    """
    inferred = infer_config_kwargs(state_dict)
    num_labels = inferred.pop("num_labels")
    chosen = {**(fpn_preset(preset) if preset else {}), **overrides}
    raise_on_contradictions(chosen, inferred, num_labels)
    return SemaskConfig(
        **{
            "semantic_window_size": inferred["window_size"],
            "id2label": {index: f"LABEL_{index}" for index in range(num_labels)},
            **chosen,
            **inferred,
        }
    )


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original SeMask-FPN keys to `SemaskForSemanticSegmentation` keys (see `convert_encoder_state_dict`)."""
    converted = convert_encoder_state_dict(state_dict, "semask.")
    for key, value in state_dict.items():
        if not key.startswith(ENCODER_KEY_PREFIX):
            converted[rename_key(key, HEAD_KEY_RENAMES)] = value
    return converted


def convert_fpn_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskForSemanticSegmentation:
    """A `SemaskForSemanticSegmentation` (eval mode) holding an original SeMask-FPN state dict.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original state dict.
        preset (`str`, *optional*), overrides (`dict`, *optional*):
            As for `config_from_original`.

    Raises:
        `CheckpointMismatchError`: settings that contradict the weights, or keys that do not fit the model.
    """
    config = config_from_original(state_dict, preset, **overrides)
    return load_converted(SemaskForSemanticSegmentation(config), convert_state_dict(state_dict))
