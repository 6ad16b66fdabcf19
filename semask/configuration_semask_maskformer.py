"""Configuration of SeMask-MaskFormer: the SeMask-Swin encoder with transformers' MaskFormer heads."""

from huggingface_hub.dataclasses import strict
from transformers import DetrConfig, MaskFormerConfig

from .configuration_semask import SemaskConfig, SemaskEncoderConfigMixin
from .presets import MASKFORMER_PRESET_NAMES, maskformer_preset, maskformer_semantic_attention

# The original SeMask-MaskFormer transformer decoder (`mask_former/config.py`): DETR's, 6 post-norm layers, dropout
# 0.1 everywhere (`nn.MultiheadAttention` and the FFN), no encoder layers (ENC_LAYERS 0).
ORIGINAL_DECODER = {
    "d_model": 256,
    "num_queries": 100,
    "decoder_layers": 6,
    "decoder_attention_heads": 8,
    "decoder_ffn_dim": 2048,
    "encoder_layers": 0,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
}


@strict
class SemaskMaskFormerConfig(SemaskEncoderConfigMixin, MaskFormerConfig):
    r"""
    Configuration of SeMask-MaskFormer (Jain et al., "SeMask: Semantically Masked Transformers for Semantic
    Segmentation"): a SeMask-Swin encoder (`backbone_config`, a [`SemaskConfig`]) feeding transformers' MaskFormer
    pixel decoder (an FPN) and DETR transformer decoder on the last stage's features, plus the parameter-free semantic
    head on the encoder's semantic priors. Use [`SemaskMaskFormerConfig.from_preset`] for the released model.

    Every [`MaskFormerConfig`] argument keeps its meaning; the defaults equal the released SeMask-L MaskFormer's
    original settings. In the original (detectron2) config's terms: `fpn_feature_size` = SEM_SEG_HEAD.CONVS_DIM,
    `mask_feature_size` = MASK_DIM, `decoder_config` = MASK_FORMER.HIDDEN_DIM (`d_model`), NUM_OBJECT_QUERIES,
    NHEADS, DIM_FEEDFORWARD, DEC_LAYERS and DROPOUT, `use_auxiliary_loss` = DEEP_SUPERVISION, `no_object_weight`,
    `dice_weight`, `mask_weight` as named, `cross_entropy_weight` = the class loss's weight (1 in the original).

    Args:
        backbone_config (`SemaskConfig` or `dict`, *optional*):
            The SeMask-Swin encoder. Its label set is always this config's; without one, a default SeMask-T. Where it
            leaves `semantic_attention` unset (or is a `dict` without it), the original SeMask-MaskFormer rule sets it
            (`semask.presets.maskformer_semantic_attention`: the first three stages windowed, the rest global).
        decoder_config (`DetrConfig` or `dict`, *optional*):
            The transformer decoder; unset settings take the original's values (`ORIGINAL_DECODER`).
        semantic_loss_weight (`float`, *optional*, defaults to 0.4):
            Weight of the semantic head's cross-entropy (the original CATE_WEIGHT), added to the MaskFormer losses.
        size_divisibility (`int`, *optional*, defaults to 32):
            Images are padded (bottom / right, with 0) to a multiple of this before the encoder, as the original
            meta-architecture does; predictions keep the padded size, and label maps are padded with `ignore_value`.
        ignore_value (`int`, *optional*, defaults to 255):
            The label of pixels that no loss counts.

    Example:

    ```python
    >>> from semask import SemaskMaskFormerConfig, SemaskMaskFormerForInstanceSegmentation

    >>> # Initializing a SeMask-MaskFormer configuration with a default SeMask-T encoder
    >>> configuration = SemaskMaskFormerConfig()

    >>> # Initializing a model (with random weights) from the configuration
    >>> model = SemaskMaskFormerForInstanceSegmentation(configuration)
    ```"""

    model_type = "semask_maskformer"
    sub_configs_defaults = {"backbone_config": SemaskConfig, "decoder_config": DetrConfig}
    backbones_supported = ["semask"]
    preset_names = MASKFORMER_PRESET_NAMES

    use_auxiliary_loss: bool = True
    semantic_loss_weight: float | int = 0.4
    size_divisibility: int = 32
    ignore_value: int = 255

    def __post_init__(self, **kwargs):
        if self.decoder_config is None or isinstance(self.decoder_config, dict):
            decoder = {key: value for key, value in (self.decoder_config or {}).items() if key != "model_type"}
            self.decoder_config = DetrConfig(**{**ORIGINAL_DECODER, **decoder})
        super().__post_init__(**kwargs)

    def semantic_attention_rule(self) -> tuple[str, ...]:
        return maskformer_semantic_attention(self.backbone_config.num_layers)

    @staticmethod
    def preset_settings(name: str) -> dict:
        return maskformer_preset(name)

    def validate_architecture(self):
        super().validate_architecture()
        if self.backbone_config.num_layers < 2:
            raise ValueError(
                "MaskFormer's FPN pixel decoder needs at least 2 encoder stages, got "
                f"{self.backbone_config.num_layers}."
            )
        if self.fpn_feature_size % 32:
            raise ValueError(
                f"MaskFormer's FPN normalises with GroupNorm(32): `fpn_feature_size` must be a multiple of 32, got "
                f"{self.fpn_feature_size}."
            )


__all__ = ["SemaskMaskFormerConfig"]
