"""Configuration of SeMask-Mask2Former: the SeMask-Swin encoder with transformers' Mask2Former heads."""

from huggingface_hub.dataclasses import strict
from transformers import Mask2FormerConfig

from .configuration_semask import SemaskConfig, SemaskEncoderConfigMixin
from .presets import MASK2FORMER_PRESET_NAMES, mask2former_preset, mask2former_semantic_attention

PIXEL_DECODERS = ("msdeformattn", "fapn", "msfapn")


@strict
class SemaskMask2FormerConfig(SemaskEncoderConfigMixin, Mask2FormerConfig):
    r"""
    Configuration of SeMask-Mask2Former (Jain et al., "SeMask: Semantically Masked Transformers for Semantic
    Segmentation"): a SeMask-Swin encoder (`backbone_config`, a [`SemaskConfig`]) feeding transformers' Mask2Former
    pixel decoder and masked-attention transformer decoder, plus the parameter-free semantic head on the encoder's
    semantic priors. Use [`SemaskMask2FormerConfig.from_preset`] for the released models.

    Every [`Mask2FormerConfig`] argument keeps its meaning; their defaults equal the released SeMask-L models' original
    settings. In the original (detectron2) config's terms: `feature_size` = SEM_SEG_HEAD.CONVS_DIM,
    `mask_feature_size` = MASK_DIM, `encoder_layers` = TRANSFORMER_ENC_LAYERS, `encoder_feedforward_dim` = the pixel
    decoder's FFN width (hard-coded to 1024 in the original), `decoder_layers` = MASK_FORMER.DEC_LAYERS (one
    prediction from the learnable queries plus `decoder_layers - 1` decoder layers), `hidden_dim`, `num_queries`,
    `num_attention_heads` (NHEADS), `dim_feedforward`, `pre_norm`, `enforce_input_projection`, the loss weights and the
    point-sampling settings as named.

    Args:
        backbone_config (`SemaskConfig` or `dict`, *optional*):
            The SeMask-Swin encoder. Its label set is always this config's (the semantic layers predict the same
            classes as the decoder); without one, a default SeMask-T. Where it leaves `semantic_attention` unset (or
            is a `dict` without it), the original rule sets it from this config's label count and pixel decoder
            (`semask.presets.mask2former_semantic_attention`: SeMask-Mask2Former's and SeMask-FaPN's differ).
        semantic_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the semantic head's cross-entropy (the original CATE_WEIGHT), added to the Mask2Former losses.
        size_divisibility (`int`, *optional*, defaults to 32):
            Images are padded (bottom / right, with 0) to a multiple of this before the encoder, as the original
            meta-architecture does; predictions keep the padded size, and label maps are padded with
            `ignore_value`.
        pixel_decoder (`str`, *optional*, defaults to `"msdeformattn"`):
            The pixel decoder: `"msdeformattn"` (transformers' Mask2Former multi-scale deformable-attention decoder,
            the original SeMask-Mask2Former) or `"fapn"` (the feature-aligned pyramid of the original
            SeMask-Mask2Former-FaPN, `PixelFANDecoder`) or `"msfapn"` (the deformable-attention decoder with a FaPN
            level, `MSDeformAttnPixelFANDecoder`); FaPN levels need a `feature_size` that is a multiple of 32.

    Example:

    ```python
    >>> from semask import SemaskConfig, SemaskMask2FormerConfig, SemaskMask2FormerForUniversalSegmentation

    >>> # Initializing a SeMask-Mask2Former configuration with a default SeMask-T encoder
    >>> configuration = SemaskMask2FormerConfig()

    >>> # Or with an explicit encoder configuration
    >>> configuration = SemaskMask2FormerConfig(backbone_config=SemaskConfig(embed_dim=96))

    >>> # Initializing a model (with random weights) from the configuration
    >>> model = SemaskMask2FormerForUniversalSegmentation(configuration)

    >>> # Accessing the model configuration
    >>> configuration = model.config
    ```"""

    model_type = "semask_mask2former"
    sub_configs_defaults = {"backbone_config": SemaskConfig}
    backbones_supported = ["semask"]
    preset_names = MASK2FORMER_PRESET_NAMES

    semantic_loss_weight: float | int = 0.4
    size_divisibility: int = 32
    pixel_decoder: str = "msdeformattn"

    def semantic_attention_rule(self) -> tuple[str, ...]:
        return mask2former_semantic_attention(self.num_labels, self.backbone_config.num_layers, self.pixel_decoder)

    @staticmethod
    def preset_settings(name: str) -> dict:
        return mask2former_preset(name)

    def validate_architecture(self):
        super().validate_architecture()
        if self.pixel_decoder not in PIXEL_DECODERS:
            raise ValueError(f"`pixel_decoder` must be one of {PIXEL_DECODERS}, got {self.pixel_decoder!r}.")
        if self.pixel_decoder != "msdeformattn" and self.feature_size % 32:
            raise ValueError(
                f"The FaPN pixel decoder normalises with GroupNorm(32): `feature_size` must be a multiple of 32, got "
                f"{self.feature_size}."
            )
        backbone = self.backbone_config
        strides = [backbone.patch_size * 2**index for index in range(backbone.num_layers)]
        if list(self.feature_strides) != strides or len(strides) != 4:
            raise ValueError(
                f"Mask2Former's pixel decoder needs 4 encoder stages with `feature_strides` {strides} (patch size "
                f"{backbone.patch_size}); got {backbone.num_layers} stages and feature_strides "
                f"{list(self.feature_strides)}."
            )


__all__ = ["SemaskMask2FormerConfig"]
