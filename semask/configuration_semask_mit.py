"""Configuration of SeMask-MiT: SegFormer's Mix Transformer with semantic attention blocks ending every stage."""

from huggingface_hub.dataclasses import strict
from transformers import SegformerConfig

from .configuration_semask import (
    check_class_ids,
    check_per_stage,
    check_semantic_settings,
    check_stage_heads,
    fill_label2id,
)
from .presets import MIT_PRESET_NAMES, mit_preset, mit_semantic_attention

DECODE_HEADS = ("mlp", "fpn")
# SegFormer settings with one value per stage.
MIT_PER_STAGE_SETTINGS = (
    "depths",
    "sr_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
)


@strict
class SemaskMitConfig(SegformerConfig):
    r"""
    Configuration of SeMask-MiT (Jain et al., "SeMask: Semantically Masked Transformers for Semantic Segmentation"):
    SegFormer's Mix Transformer encoder whose stages end with semantic attention blocks, and SegFormer's all-MLP
    decode head or SeMask's semantic-FPN head, each with the parameter-free semantic branch. No official SeMask-MiT
    code or weights exist; the design follows SeMask-Swin (see `docs/mit.md`). The defaults describe MiT-B0; use
    [`SemaskMitConfig.from_preset`] for B0 ... B5. Every [`SegformerConfig`] argument keeps its meaning.

    Args:
        num_semantic_blocks (`list[int]`, *optional*, defaults to `[1, 1, 1, 1]`):
            Number of semantic attention blocks at the end of each stage; all 0 gives a plain SegFormer.
        semantic_attention (`list[str]`, *optional*):
            Per stage, `"windowed"` or `"global"` semantic attention. When unset (`None`, the default), the config
            applies SeMask-MiT's rule from the label count (`semask.presets.mit_semantic_attention`: the last two
            stages global with more than 19 classes, as SeMask-FPN's ADE20K models).
        semantic_window_size (`int`, *optional*, defaults to 7):
            Window size of the windowed semantic attention (never shifted).
        semantic_dropout_prob (`float`, *optional*, defaults to 0.1):
            The dropout probability on the semantic attention output.
        semantic_loss_weight (`float`, *optional*, defaults to 0.4):
            The weight of the semantic-branch loss.
        loss_reduction (`str`, *optional*, defaults to `"all_pixels"`):
            How each cross-entropy is averaged: `"all_pixels"` divides by all pixels, ignored ones included, as
            mmsegmentation 0.x (and SeMask-FPN) does; `"valid_pixels"` by the non-ignored pixels, as
            `torch.nn.CrossEntropyLoss` (and transformers' SegFormer) does.
        decode_head (`str`, *optional*, defaults to `"mlp"`):
            `"mlp"`: SegFormer's all-MLP head (`decoder_hidden_size` channels); `"fpn"`: SeMask's semantic-FPN head
            (`decoder_hidden_size` channels, 256 in SeMask-FPN).
        align_corners (`bool`, *optional*, defaults to `False`):
            The `align_corners` of the bilinear resizes of the semantic branch, the FPN head and the losses
            (SegFormer's MLP head always resizes with `False`).

    Example:

    ```python
    >>> from semask import SemaskMitConfig, SemaskMitForSemanticSegmentation

    >>> # A SeMask-MiT-B0 with the all-MLP head and the ADE20K labels (random weights)
    >>> configuration = SemaskMitConfig.from_preset("semask-mit-b0-ade20k")
    >>> model = SemaskMitForSemanticSegmentation(configuration)
    ```"""

    model_type = "semask_mit"
    preset_names = MIT_PRESET_NAMES

    num_semantic_blocks: list[int] | tuple[int, ...] = (1, 1, 1, 1)
    semantic_attention: list[str] | tuple[str, ...] | None = None
    semantic_window_size: int = 7
    semantic_dropout_prob: float | int = 0.1
    semantic_loss_weight: float | int = 0.4
    loss_reduction: str = "all_pixels"
    decode_head: str = "mlp"
    align_corners: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        fill_label2id(self)
        if self.semantic_attention is None:
            self.semantic_attention = mit_semantic_attention(self.num_labels, self.num_encoder_blocks)

    @property
    def has_semantic_layers(self) -> bool:
        """Whether the stages end with semantic attention blocks (False for a plain SegFormer)."""
        return any(self.num_semantic_blocks)

    def validate_architecture(self):
        super().validate_architecture()
        names = (*MIT_PER_STAGE_SETTINGS, "num_semantic_blocks", "semantic_attention")
        check_per_stage(self.num_encoder_blocks, **{name: getattr(self, name) for name in names})
        check_stage_heads(self.hidden_sizes, self.num_attention_heads)
        check_semantic_settings(self, plain_model="plain SegFormer")
        if self.decode_head not in DECODE_HEADS:
            raise ValueError(f"`decode_head` must be one of {DECODE_HEADS}, got {self.decode_head!r}.")
        if not self.reshape_last_stage:
            raise ValueError("SeMask-MiT returns every stage as a map: `reshape_last_stage` must be True.")
        check_class_ids(self.id2label)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SemaskMitConfig":
        """The configuration of a SeMask-MiT model, e.g. ``"semask-mit-b0-ade20k"``.

        Available names are in `SemaskMitConfig.preset_names`; keyword arguments override preset values.
        """
        return cls(**{**mit_preset(name), **overrides})


__all__ = ["SemaskMitConfig"]
