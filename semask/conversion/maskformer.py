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
    check_label_count,
    convert_encoder_state_dict,
    infer_encoder_kwargs,
    key_indices,
    load_converted,
    raise_on_contradictions,
    rename_key,
    require_key,
    split_fused_projection,
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
NO_OBJECT_WEIGHT_KEY = "criterion.empty_weight"
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
    (decoder settings under `decoder_config`)."""
    mask_features = require_key(state_dict, ORIGINAL_PIXEL_DECODER + "mask_features.weight")
    queries = require_key(state_dict, PREDICTOR + "query_embed.weight")
    classifier = require_key(state_dict, PREDICTOR + "class_embed.weight")
    decoder = {
        "d_model": queries.shape[1],
        "num_queries": queries.shape[0],
        "decoder_layers": len(key_indices(state_dict, rf"{re.escape(ORIGINAL_DECODER_LAYERS)}(\d+)\.")),
        "decoder_ffn_dim": require_key(state_dict, MASKFORMER_DETECTION_KEY).shape[0],
    }
    kwargs = {
        "fpn_feature_size": mask_features.shape[1],
        "mask_feature_size": mask_features.shape[0],
        "decoder_config": decoder,
        "num_labels": classifier.shape[0] - 1,
    }
    if NO_OBJECT_WEIGHT_KEY in state_dict:
        kwargs["no_object_weight"] = float(f"{state_dict[NO_OBJECT_WEIGHT_KEY][-1].item():.7g}")  # float32 -> decimal
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
    head = infer_head_kwargs(state_dict)
    num_labels = head.pop("num_labels")
    inferred_decoder = head.pop("decoder_config")
    check_label_count(state_dict, num_labels, "class predictor")
    encoder = infer_encoder_kwargs(state_dict)
    chosen = maskformer_preset(preset) if preset else {}
    chosen_encoder = chosen.pop("backbone_config", {})
    chosen_decoder = {key: overrides.pop(key) for key in DECODER_SETTINGS if key in overrides}
    for key in set(overrides) & ENCODER_SETTINGS:
        chosen_encoder[key] = overrides.pop(key)
    chosen.update(overrides)
    raise_on_contradictions(chosen, head, num_labels)
    raise_on_contradictions(chosen_encoder, encoder, num_labels)
    raise_on_contradictions(chosen_decoder, inferred_decoder, num_labels)
    id2label = chosen.pop("id2label", {index: f"LABEL_{index}" for index in range(num_labels)})
    backbone = {"semantic_window_size": 7, **chosen_encoder, **encoder}
    return SemaskMaskFormerConfig(
        **{
            **chosen,
            **head,
            "backbone_config": backbone,
            "decoder_config": {**chosen_decoder, **inferred_decoder},
            "id2label": id2label,
        }
    )


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
        key = rename_key(key, HEAD_KEY_RENAMES)
        if in_proj := IN_PROJ.match(key):
            converted |= split_fused_projection(f"{in_proj[1]}.", in_proj[2], value)
        else:
            converted[key] = value
    return converted


def convert_maskformer_checkpoint(
    state_dict: dict[str, torch.Tensor], preset: str | None = None, **overrides
) -> SemaskMaskFormerForInstanceSegmentation:
    """A `SemaskMaskFormerForInstanceSegmentation` (eval mode) holding an original SeMask-MaskFormer state dict;
    arguments and errors as for `semask.conversion.fpn.convert_fpn_checkpoint`."""
    model = SemaskMaskFormerForInstanceSegmentation(config_from_original(state_dict, preset, **overrides))
    converted = convert_state_dict(state_dict)
    # The loss buffer follows `no_object_weight` (inferred from it); without scipy the model has no loss module.
    converted.pop(NO_OBJECT_WEIGHT_KEY, None)
    if model.criterion is not None:
        converted[NO_OBJECT_WEIGHT_KEY] = model.criterion.empty_weight
    return load_converted(model, converted)
