"""Conversion of original SeMask-MaskFormer (detectron2) checkpoints to `SemaskMaskFormerForInstanceSegmentation`.

`semask.conversion` recognises these checkpoints by their DETR decoder (`sem_seg_head.predictor.transformer.decoder.*`
keys). The encoder's keys are renamed as for SeMask-FPN; the FPN pixel decoder (`BasePixelDecoder`), the DETR decoder
and the predictors take transformers' MaskFormer names, and the fused `in_proj` of both attentions is split into
q / k / v.

The weights fix the encoder, the class count, the FPN and mask widths, the decoder width, queries, layers and FFN
width, and the no-object weight. The decoder's head count is not in the weights: it comes from the preset or the
overrides (`decoder_attention_heads`), otherwise the original's 8. The SeMask-MaskFormer semantic-attention rule
(`semask.presets.maskformer_semantic_attention`) applies unless `semantic_attention` is given.
"""

import re
from dataclasses import fields

import torch

from ..configuration_semask import SemaskConfig
from ..configuration_semask_maskformer import SemaskMaskFormerConfig
from ..modeling_semask_maskformer import SemaskMaskFormerForInstanceSegmentation
from ..presets import maskformer_preset
from .common import (
    ENCODER_KEY_PREFIX,
    KeyRenames,
    convert_encoder_state_dict,
    detectron2_config_kwargs,
    key_indices,
    load_with_loss_buffer,
    renamed_head_weight,
    require_key,
)

ENCODER_PREFIX = "model.pixel_level_module.encoder."
FPN = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."
ORIGINAL_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
ORIGINAL_DECODER_LAYERS = PREDICTOR + "transformer.decoder.layers."
MASKFORMER_DETECTION_KEY = ORIGINAL_DECODER_LAYERS + "0.linear1.weight"  # only the DETR decoder has it
# DETR decoder layer parts: original name -> transformers' MaskFormer name.
DECODER_LAYER_PARTS = {
    "self_attn": "self_attn",
    "multihead_attn": "encoder_attn",
    "norm1": "self_attn_layer_norm",
    "norm2": "encoder_attn_layer_norm",
    "norm3": "final_layer_norm",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
}
HEAD_KEY_RENAMES: KeyRenames = [
    (r"sem_seg_head\.pixel_decoder\.mask_features\.", FPN + "mask_projection."),
    (
        rf"{re.escape(ORIGINAL_DECODER_LAYERS)}(\d+)\.(\w+)\.",
        lambda m: f"{TRANSFORMER}decoder.layers.{m[1]}.{DECODER_LAYER_PARTS.get(m[2], m[2])}.",
    ),
    (r"\.out_proj\.", ".o_proj."),
    (r"sem_seg_head\.predictor\.transformer\.decoder\.norm\.", TRANSFORMER + "decoder.layernorm."),
    (r"sem_seg_head\.predictor\.query_embed\.", TRANSFORMER + "queries_embedder."),
    (r"sem_seg_head\.predictor\.input_proj\.", TRANSFORMER + "input_projection."),
    (r"sem_seg_head\.predictor\.class_embed\.", "class_predictor."),
    (r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.", r"mask_embedder.\1.0."),
]
FPN_KEY = re.compile(r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.(weight|norm\.\w+)$")
IN_PROJ = re.compile(r"(.*_attn)\.in_proj_(weight|bias)$")
ENCODER_SETTINGS = {field.name for field in fields(SemaskConfig)} - {
    field.name for field in fields(SemaskMaskFormerConfig)
}
DECODER_SETTINGS = ("d_model", "num_queries", "decoder_layers", "decoder_ffn_dim", "decoder_attention_heads")


def fpn_key(key: str, num_stages: int) -> str | None:
    """The semask name of an original `BasePixelDecoder` conv or norm key (None for other keys).

    `layer_<num_stages>` (the coarsest stage's 3x3 conv) is transformers' FPN `stem`; `adapter_<n>` / `layer_<n>`
    (stage n's lateral 1x1 conv and output 3x3 conv) are `layers.<num_stages - 1 - n>`'s `proj` and `block`.
    """
    match = FPN_KEY.match(key)
    if match is None:
        return None
    module, stage, part = match[1], int(match[2]), match[3]
    index = "0" if part == "weight" else "1"  # the conv, then its GroupNorm
    tail = part if part == "weight" else part.removeprefix("norm.")
    if module == "layer" and stage == num_stages:
        return f"{FPN}fpn.stem.{index}.{tail}"
    part_name = "proj" if module == "adapter" else "block"
    return f"{FPN}fpn.layers.{num_stages - 1 - stage}.{part_name}.{index}.{tail}"


def infer_head_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskMaskFormerConfig` arguments that the original `sem_seg_head.*` / `criterion.*` weights determine
    (with the decoder settings of `DECODER_SETTINGS` among them)."""
    mask_features = require_key(state_dict, ORIGINAL_PIXEL_DECODER + "mask_features.weight")
    queries = require_key(state_dict, PREDICTOR + "query_embed.weight")
    classifier = require_key(state_dict, PREDICTOR + "class_embed.weight")
    kwargs = {
        "fpn_feature_size": mask_features.shape[1],
        "mask_feature_size": mask_features.shape[0],
        "d_model": queries.shape[1],
        "num_queries": queries.shape[0],
        "decoder_layers": len(key_indices(state_dict, rf"{re.escape(ORIGINAL_DECODER_LAYERS)}(\d+)\.")),
        "decoder_ffn_dim": require_key(state_dict, MASKFORMER_DETECTION_KEY).shape[0],
        "num_labels": classifier.shape[0] - 1,
    }
    return kwargs


def config_from_original(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskMaskFormerConfig:
    """A `SemaskMaskFormerConfig` for an original SeMask-MaskFormer checkpoint: inferred from the weights, then the
    preset, then `overrides`.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original state dict (meta tensors suffice, except for `criterion.empty_weight`).
        preset (`str`, *optional*):
            A SeMask-MaskFormer preset, ``"semask-large-maskformer-ade20k"``.
        overrides (`dict`, *optional*):
            Config arguments over the preset's; encoder settings (`semantic_attention`, ...) go to the encoder and
            decoder settings (`decoder_attention_heads`, ...) to the decoder.

    Raises:
        `CheckpointMismatchError`: a preset or override that contradicts the weights.
    """
    chosen = maskformer_preset(preset) if preset else {}
    kwargs = detectron2_config_kwargs(state_dict, infer_head_kwargs(state_dict), chosen, overrides, ENCODER_SETTINGS)
    kwargs["decoder_config"] = {key: kwargs.pop(key) for key in DECODER_SETTINGS if key in kwargs}
    return SemaskMaskFormerConfig(**kwargs)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original SeMask-MaskFormer keys to `SemaskMaskFormerForInstanceSegmentation` keys: the encoder's as
    `convert_encoder_state_dict` does, the FPN's by `fpn_key`, the rest of the head's to transformers' MaskFormer
    names, with each attention's fused `in_proj` split into q / k / v."""
    converted = convert_encoder_state_dict(state_dict, ENCODER_PREFIX)
    num_stages = len(key_indices(state_dict, r"backbone\.layers\.(\d+)\."))
    for key, value in state_dict.items():
        if key.startswith(ENCODER_KEY_PREFIX):
            continue
        if (new_key := fpn_key(key, num_stages)) is not None:
            converted[new_key] = value
            continue
        converted |= renamed_head_weight(key, value, HEAD_KEY_RENAMES, IN_PROJ)
    return converted


def convert_maskformer_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskMaskFormerForInstanceSegmentation:
    """A `SemaskMaskFormerForInstanceSegmentation` (eval mode) holding an original SeMask-MaskFormer state dict;
    arguments and errors as for `semask.conversion.fpn.convert_fpn_checkpoint`."""
    model = SemaskMaskFormerForInstanceSegmentation(config_from_original(state_dict, preset, **overrides))
    return load_with_loss_buffer(model, convert_state_dict(state_dict))
