"""Configuration of SeMask: a Swin encoder with semantic layers and the semantic-FPN decode head."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .presets import PRESET_NAMES, fpn_preset

SEMANTIC_ATTENTION_KINDS = ("windowed", "global")
LOSS_REDUCTIONS = ("all_pixels", "valid_pixels")


def settings_equal(first, second) -> bool:
    """Compare two config values, treating lists and tuples alike."""
    as_list = lambda value: list(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    return as_list(first) == as_list(second)


def check_class_ids(id2label: dict[int, str] | None) -> None:
    """Raise a ValueError unless `id2label` names the classes 0..N-1 (each id is a logit channel)."""
    if id2label is None:
        return
    ids, expected = sorted(map(int, id2label)), list(range(len(id2label)))
    if ids != expected:
        raise ValueError(
            f"`id2label` must use the class ids 0..{len(ids) - 1} (one channel each), got {ids} "
            f"(missing ids: {sorted(set(expected) - set(ids))})."
        )


@strict
class SemaskConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a SeMask model (Jain et al., "SeMask: Semantically Masked Transformers for Semantic
    Segmentation"). The defaults describe SeMask-T with the semantic-FPN head; use
    [`SemaskConfig.from_preset`] for the released models.

    Swin encoder (names as in `SwinConfig`):
        image_size (`int`): pre-training image size; only sizes the absolute position embedding.
        patch_size, num_channels, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias,
        hidden_dropout_prob (the original `drop_rate`), attention_probs_dropout_prob, drop_path_rate,
        hidden_act, use_absolute_embeddings (the original `ape`), layer_norm_eps, initializer_range.
        patch_norm (`bool`): apply a LayerNorm after the patch embedding.

    Semantic layers (one after the Swin blocks of every stage):
        semantic_window_size (`int`): window of the windowed semantic attention (never shifted).
        num_semantic_blocks (`list[int]`): semantic attention blocks per stage; all 0 gives a plain Swin-FPN.
        semantic_attention (`list[str]`): per stage, `"windowed"` or `"global"`. The original SeMask-FPN
            chooses this by a rule in its code (see `semask.presets.fpn_semantic_attention`); here it is explicit.
        semantic_dropout_prob (`float`): dropout on the semantic attention output (0.1 in the original).

    Semantic-FPN head and losses:
        decoder_hidden_size (`int`): channels of the FPN scale heads (the original `channels`).
        classifier_dropout_prob (`float`): Dropout2d before the classifier (the original `dropout_ratio`).
        semantic_loss_weight (`float`): weight of the semantic-branch loss (the original `cate_w`).
        semantic_loss_ignore_index (`int`): label value ignored by both losses.
        loss_reduction (`str`): `"all_pixels"` divides each cross-entropy by all pixels, ignored ones included,
            as mmsegmentation 0.x does (the original training objective); `"valid_pixels"` divides by the
            non-ignored pixels, as `torch.nn.CrossEntropyLoss` does.
        align_corners (`bool`): `align_corners` of every bilinear resize in the head and the losses.

    Backbone use: `out_features` / `out_indices` select among `stem, stage1, ..., stageN` (default: every stage).
    """

    model_type = "semask"
    preset_names = PRESET_NAMES
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float | int = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.3
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    patch_norm: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    semantic_window_size: int = 7
    num_semantic_blocks: list[int] | tuple[int, ...] = (1, 1, 1, 1)
    semantic_attention: list[str] | tuple[str, ...] = ("windowed", "windowed", "windowed", "windowed")
    semantic_dropout_prob: float | int = 0.1
    decoder_hidden_size: int = 256
    classifier_dropout_prob: float | int = 0.1
    semantic_loss_weight: float | int = 0.4
    semantic_loss_ignore_index: int = 255
    loss_reduction: str = "all_pixels"
    align_corners: bool = False
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.num_layers = len(self.depths)
        self.hidden_size = int(self.embed_dim * 2 ** (self.num_layers - 1))
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, self.num_layers + 1)]
        out_features = kwargs.pop("out_features", None)
        out_indices = kwargs.pop("out_indices", None)
        if out_features is None and out_indices is None:
            out_indices = list(range(1, self.num_layers + 1))
        self.set_output_features_output_indices(out_indices=out_indices, out_features=out_features)
        super().__post_init__(**kwargs)
        if self.id2label is not None and self.label2id is None:
            self.label2id = {name: index for index, name in self.id2label.items()}

    @property
    def has_semantic_layers(self) -> bool:
        """Whether the stages end with semantic layers (False for the plain Swin-FPN baseline)."""
        return any(self.num_semantic_blocks)

    def validate_architecture(self):
        super().validate_architecture()
        per_stage = {
            "num_heads": self.num_heads,
            "num_semantic_blocks": self.num_semantic_blocks,
            "semantic_attention": self.semantic_attention,
        }
        for name, values in per_stage.items():
            if len(values) != len(self.depths):
                raise ValueError(f"`{name}` needs one value per stage ({len(self.depths)}), got {list(values)}.")
        for index, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**index) % heads:
                raise ValueError(
                    f"Stage {index + 1} width {self.embed_dim * 2**index} is not divisible by {heads} heads."
                )
        unknown = set(self.semantic_attention) - set(SEMANTIC_ATTENTION_KINDS)
        if unknown:
            raise ValueError(
                f"`semantic_attention` values must be in {SEMANTIC_ATTENTION_KINDS}, got {sorted(unknown)}."
            )
        if self.has_semantic_layers and not all(self.num_semantic_blocks):
            raise ValueError(
                "`num_semantic_blocks` must be positive for every stage (SeMask) or 0 for every stage (plain "
                f"Swin-FPN); got {list(self.num_semantic_blocks)}."
            )
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}.")
        check_class_ids(self.id2label)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SemaskConfig":
        """The configuration of a released SeMask-FPN model, e.g. ``"semask-tiny-fpn-ade20k"``.

        Available names are in `SemaskConfig.preset_names`; keyword arguments override preset values.
        """
        return cls(**{**fpn_preset(name), **overrides})


__all__ = ["SemaskConfig"]
