"""Conversion of original SeMask-Mask2Former (detectron2) checkpoints to `SemaskMask2FormerForUniversalSegmentation`.

`semask.conversion` (and so `semask-convert`) recognises these checkpoints by their `sem_seg_head.*` keys. The
encoder's keys are renamed as for SeMask-FPN; the pixel decoder, transformer decoder and class predictor take
transformers' Mask2Former names, and the decoder self-attention's fused `in_proj` is split into q / k / v.

The weights fix the encoder, the class count, the pixel decoder (width, layers, FFN width, heads, FPN levels), the
transformer decoder (width, queries, layers, FFN width) and the no-object weight. The head count (`num_attention_heads`,
the original NHEADS of both decoders) is in the weights of the deformable-attention decoders only; with the FaPN
decoder it comes from the preset or the overrides, otherwise the original's 8. The rest comes from the preset, the
overrides or the original's defaults: semantic window 7, post-norm, the loss settings of `Mask2FormerConfig`, and the
semantic-attention rule of the original codebase of its pixel decoder (`semask.presets.mask2former_semantic_attention`),
which `SemaskMask2FormerConfig` applies unless `semantic_attention` is given.
"""

import re
from dataclasses import fields

import torch

from ..configuration_semask import SemaskConfig
from ..configuration_semask_mask2former import SemaskMask2FormerConfig
from ..modeling_semask_mask2former import SemaskMask2FormerForUniversalSegmentation
from ..presets import mask2former_preset
from .common import (
    ENCODER_KEY_PREFIX,
    CheckpointMismatchError,
    KeyRenames,
    convert_encoder_state_dict,
    detectron2_config_kwargs,
    key_indices,
    load_with_loss_buffer,
    renamed_head_weight,
    require_key,
)

ENCODER_PREFIX = "model.pixel_level_module.encoder."
PIXEL_DECODER = "model.pixel_level_module.decoder."
TRANSFORMER = "model.transformer_module."
# Layer parts: original name -> transformers' Mask2Former name.
PIXEL_DECODER_LAYER_PARTS = {
    "norm1": "self_attn_layer_norm",
    "linear1": "fc1",
    "linear2": "fc2",
    "norm2": "final_layer_norm",
}
DECODER_LAYER_PARTS = {
    "transformer_self_attention_layers": {"self_attn": "self_attn", "norm": "self_attn_layer_norm"},
    "transformer_cross_attention_layers": {"multihead_attn": "cross_attn", "norm": "cross_attn_layer_norm"},
    "transformer_ffn_layers": {"linear1": "fc1", "linear2": "fc2", "norm": "final_layer_norm"},
}
# (original key pattern, semask key template), applied in order; unknown names pass unchanged.
HEAD_KEY_RENAMES: KeyRenames = [
    (
        r"sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(\w+)\.",
        lambda m: f"{PIXEL_DECODER}encoder.layers.{m[1]}.{PIXEL_DECODER_LAYER_PARTS.get(m[2], m[2])}.",
    ),
    (r"sem_seg_head\.pixel_decoder\.transformer\.level_embed$", PIXEL_DECODER + "level_embed"),
    (r"sem_seg_head\.pixel_decoder\.input_proj\.", PIXEL_DECODER + "input_projections."),
    (r"sem_seg_head\.pixel_decoder\.mask_features\.", PIXEL_DECODER + "mask_projection."),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.weight$", PIXEL_DECODER + r"\1_\2.0.weight"),
    (r"sem_seg_head\.pixel_decoder\.(adapter|layer)_(\d+)\.norm\.", PIXEL_DECODER + r"\1_\2.1."),
    (
        r"sem_seg_head\.predictor\.(transformer_\w+_layers)\.(\d+)\.(\w+)\.",
        lambda m: f"{TRANSFORMER}decoder.layers.{m[2]}.{DECODER_LAYER_PARTS.get(m[1], {}).get(m[3], m[3])}.",
    ),
    (r"sem_seg_head\.predictor\.decoder_norm\.", TRANSFORMER + "decoder.layernorm."),
    (r"sem_seg_head\.predictor\.query_feat\.", TRANSFORMER + "queries_features."),
    (r"sem_seg_head\.predictor\.query_embed\.", TRANSFORMER + "queries_embedder."),
    (r"sem_seg_head\.predictor\.level_embed\.", TRANSFORMER + "level_embed."),
    (r"sem_seg_head\.predictor\.input_proj\.", TRANSFORMER + "input_projections."),
    (r"sem_seg_head\.predictor\.class_embed\.", "class_predictor."),
    (
        r"sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.",
        TRANSFORMER + r"decoder.mask_predictor.mask_embedder.\1.0.",
    ),
]
ORIGINAL_PIXEL_DECODER = "sem_seg_head.pixel_decoder."
FAPN_DETECTION_KEY = ORIGINAL_PIXEL_DECODER + "align_1.dcpack_L2.weight"  # only `PixelFANDecoder` has it
FAPN_KEY = re.compile(r"(adapter|align|layer)_(\d+)\.(.+)$")
FAPN_LEVEL_PARTS = [  # (original part after `<module>_<n>.`, semask part after `levels.<n - 1>.`)
    ("adapter", r"weight$", "lateral.conv.weight"),
    ("adapter", r"norm\.", "lateral.norm."),
    ("align", r"offset\.weight$", "offset.weight"),
    ("align", r"dcpack_L2\.", "deform_conv."),
    ("layer", r"weight$", "output.weight"),
    ("layer", r"norm\.", "norm."),
]
SELF_ATTENTION_IN_PROJ = re.compile(r"(.*\.self_attn)\.in_proj_(weight|bias)$")
# `MSDeformAttnPixelDecoder`'s deformable attention: 3 feature levels, 4 sampling points (fixed in both codes).
DEFORMABLE_LEVELS, DEFORMABLE_POINTS = 3, 4
ENCODER_SETTINGS = {field.name for field in fields(SemaskConfig)} - {
    field.name for field in fields(SemaskMask2FormerConfig)
}


def original_pixel_decoder(state_dict: dict[str, torch.Tensor]) -> str:
    """The `pixel_decoder` of an original SeMask-Mask2Former state dict: `"fapn"` (`PixelFANDecoder`), `"msfapn"`
    (`MSDeformAttnPixelFANDecoder`: FaPN alignment and a deformable-attention encoder) or `"msdeformattn"`."""
    if FAPN_DETECTION_KEY not in state_dict:
        return "msdeformattn"
    deformable = any(key.startswith(ORIGINAL_PIXEL_DECODER + "transformer.") for key in state_dict)
    return "msfapn" if deformable else "fapn"


def fapn_decoder_keys(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The original keys of the FaPN part of the pixel decoder: the whole `PixelFANDecoder`, or the FaPN levels and
    mask projection of an `MSDeformAttnPixelFANDecoder` (none for `MSDeformAttnPixelDecoder`)."""
    kind = original_pixel_decoder(state_dict)
    if kind == "msdeformattn":
        return set()
    decoder_keys = {key for key in state_dict if key.startswith(ORIGINAL_PIXEL_DECODER)}
    if kind == "fapn":
        return decoder_keys
    fapn_part = re.compile(rf"{re.escape(ORIGINAL_PIXEL_DECODER)}((adapter|align|layer)_\d+|mask_features)\.")
    return {key for key in decoder_keys if fapn_part.match(key)}


def fapn_decoder_key(key: str, num_levels: int) -> str | None:
    """The semask name (after the pixel decoder's prefix) of an original `PixelFANDecoder` key (after
    `sem_seg_head.pixel_decoder.`); None for `align_<n>.offset.norm.*`, which repeat `layer_<n>.norm.*` (the original
    hands one GroupNorm to both; semask keeps it once, as `levels.<n - 1>.norm`)."""
    if key.startswith("mask_features."):
        return "mask_projection." + key.removeprefix("mask_features.")
    match = FAPN_KEY.match(key)
    if match is None:
        return key
    module, level, part = match[1], int(match[2]), match[3]
    if module == "layer" and level == num_levels:  # the coarsest stage: only its 3x3 conv
        return "coarsest." + ("conv.weight" if part == "weight" else part)
    if module == "align" and part.startswith("offset.norm."):
        return None
    for original_module, pattern, semask_part in FAPN_LEVEL_PARTS:
        if module == original_module and re.match(pattern, part):
            return f"levels.{level - 1}.{re.sub(pattern, semask_part, part, count=1)}"
    return key


def convert_fapn_decoder_state_dict(
    decoder_state: dict[str, torch.Tensor], with_coarsest: bool = True
) -> dict[str, torch.Tensor]:
    """Original FaPN pixel-decoder keys (without `sem_seg_head.pixel_decoder.`) with semask's names: a whole
    `PixelFANDecoder` (`with_coarsest`: its last `layer_<n>` is the coarsest stage's conv), or the FaPN levels and
    mask projection of an `MSDeformAttnPixelFANDecoder`; a CheckpointMismatchError where a level's two copies of its
    shared norm differ."""
    num_levels = len(key_indices(decoder_state, r"layer_(\d+)\.")) if with_coarsest else 0
    converted = {}
    for key, value in decoder_state.items():
        new_key = fapn_decoder_key(key, num_levels)
        if new_key is not None:
            converted[new_key] = value
            continue
        shared = decoder_state.get(key.replace("align_", "layer_", 1).replace(".offset.norm.", ".norm.", 1))
        if shared is None or not torch.equal(shared, value):
            raise CheckpointMismatchError(
                f"{key} should equal the output norm it shares in the original FaPN decoder, but differs from it."
            )
    return converted


def infer_head_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """The `SemaskMask2FormerConfig` arguments that the original `sem_seg_head.*` / `criterion.*` weights determine."""
    decoder, predictor = ORIGINAL_PIXEL_DECODER, "sem_seg_head.predictor."
    mask_features = require_key(state_dict, decoder + "mask_features.weight")
    queries = require_key(state_dict, predictor + "query_feat.weight")
    classifier = require_key(state_dict, predictor + "class_embed.weight")
    kwargs = {
        "feature_size": mask_features.shape[1],
        "mask_feature_size": mask_features.shape[0],
        "pixel_decoder": original_pixel_decoder(state_dict),
        **(
            {} if original_pixel_decoder(state_dict) == "fapn" else infer_deformable_decoder_kwargs(state_dict, decoder)
        ),
        "hidden_dim": queries.shape[1],
        "num_queries": queries.shape[0],
        "decoder_layers": len(key_indices(state_dict, rf"{re.escape(predictor)}transformer_ffn_layers\.(\d+)\.")) + 1,
        "dim_feedforward": require_key(state_dict, predictor + "transformer_ffn_layers.0.linear1.weight").shape[0],
        "enforce_input_projection": predictor + "input_proj.0.weight" in state_dict,
        "num_labels": classifier.shape[0] - 1,
    }
    return kwargs


def infer_deformable_decoder_kwargs(state_dict: dict[str, torch.Tensor], decoder: str) -> dict:
    """The settings of an original `MSDeformAttnPixelDecoder` that its weights determine."""
    first_encoder_layer = decoder + "transformer.encoder.layers.0."
    sampling_offsets = require_key(state_dict, first_encoder_layer + "self_attn.sampling_offsets.weight")
    num_fpn_levels = len(key_indices(state_dict, rf"{re.escape(decoder)}adapter_(\d+)\."))
    return {
        "encoder_layers": len(key_indices(state_dict, rf"{re.escape(decoder)}transformer\.encoder\.layers\.(\d+)\.")),
        "encoder_feedforward_dim": require_key(state_dict, first_encoder_layer + "linear1.weight").shape[0],
        "num_attention_heads": sampling_offsets.shape[0] // (DEFORMABLE_LEVELS * DEFORMABLE_POINTS * 2),
        "common_stride": 8 // 2**num_fpn_levels,
    }


def config_from_original(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskMask2FormerConfig:
    """A `SemaskMask2FormerConfig` for an original SeMask-Mask2Former checkpoint: inferred from the weights, then the
    preset, then `overrides`.

    Args:
        state_dict (`dict[str, torch.Tensor]`):
            The original state dict (meta tensors suffice, except for `criterion.empty_weight`).
        preset (`str`, *optional*):
            A SeMask-Mask2Former preset, e.g. ``"semask-large-mask2former-ade20k"``.
        overrides (`dict`, *optional*):
            Config arguments over the preset's; encoder settings (`semantic_attention`, `semantic_window_size`, ...)
            go to the encoder.

    Raises:
        `CheckpointMismatchError`: a preset or override that contradicts the weights.
    """
    if "decoder_attention_heads" in overrides:  # the CLI's name; one head count serves both decoders here
        overrides["num_attention_heads"] = overrides.pop("decoder_attention_heads")
    chosen = mask2former_preset(preset) if preset else {}
    kwargs = detectron2_config_kwargs(state_dict, infer_head_kwargs(state_dict), chosen, overrides, ENCODER_SETTINGS)
    return SemaskMask2FormerConfig(**kwargs)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original SeMask-Mask2Former keys to `SemaskMask2FormerForUniversalSegmentation` keys: the encoder's as
    `convert_encoder_state_dict` does, a FaPN pixel decoder's by `convert_fapn_decoder_state_dict`, the rest of the
    head's to transformers' Mask2Former names, with the decoder self-attention's fused `in_proj` split into q / k /
    v."""
    converted = convert_encoder_state_dict(state_dict, ENCODER_PREFIX)
    fapn_keys = fapn_decoder_keys(state_dict)
    if fapn_keys:
        fapn_state = {key.removeprefix(ORIGINAL_PIXEL_DECODER): state_dict[key] for key in fapn_keys}
        with_coarsest = original_pixel_decoder(state_dict) == "fapn"
        renamed = convert_fapn_decoder_state_dict(fapn_state, with_coarsest)
        if not with_coarsest:  # MSFaPN: the FaPN level feeds its own mask projection
            renamed = {
                key.replace("mask_projection.", "fpn_mask_projection.", 1): value for key, value in renamed.items()
            }
        converted |= {PIXEL_DECODER + key: value for key, value in renamed.items()}
    for key, value in state_dict.items():
        if key.startswith(ENCODER_KEY_PREFIX) or key in fapn_keys:
            continue
        converted |= renamed_head_weight(key, value, HEAD_KEY_RENAMES, SELF_ATTENTION_IN_PROJ)
    return converted


def convert_mask2former_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskMask2FormerForUniversalSegmentation:
    """A `SemaskMask2FormerForUniversalSegmentation` (eval mode) holding an original SeMask-Mask2Former state dict;
    arguments and errors as for `semask.conversion.fpn.convert_fpn_checkpoint`."""
    model = SemaskMask2FormerForUniversalSegmentation(config_from_original(state_dict, preset, **overrides))
    return load_with_loss_buffer(model, convert_state_dict(state_dict))
