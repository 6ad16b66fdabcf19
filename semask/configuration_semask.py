"""Configuration of SeMask: a Swin encoder with semantic layers and the semantic-FPN decode head."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .presets import PRESET_NAMES, fpn_preset, fpn_semantic_attention

SEMANTIC_ATTENTION_KINDS = ("windowed", "global")
LOSS_REDUCTIONS = ("all_pixels", "valid_pixels")


def settings_equal(first, second) -> bool:
    """Compare two config values, treating lists and tuples alike."""
    as_list = lambda value: list(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    return as_list(first) == as_list(second)


def fill_label2id(config: PreTrainedConfig) -> None:
    """Set `config.label2id` from `config.id2label` when only the latter is given."""
    if config.id2label is not None and config.label2id is None:
        config.label2id = {name: index for index, name in config.id2label.items()}


def check_per_stage(num_stages: int, **per_stage) -> None:
    """Raise a ValueError unless each of the `per_stage` settings has one value per stage."""
    for name, values in per_stage.items():
        if len(values) != num_stages:
            raise ValueError(f"`{name}` needs one value per stage ({num_stages}), got {list(values)}.")


def check_stage_heads(widths: list[int], num_heads: list[int]) -> None:
    """Raise a ValueError unless each stage's width is a multiple of its number of attention heads."""
    for index, (width, heads) in enumerate(zip(widths, num_heads)):
        if width % heads:
            raise ValueError(f"Stage {index + 1} width {width} is not divisible by {heads} heads.")


def check_semantic_settings(config: PreTrainedConfig, plain_model: str) -> None:
    """Raise a ValueError unless `config`'s semantic attention kinds and loss reduction are known, its semantic
    window is positive and its stages all have semantic blocks, or none (`plain_model`)."""
    unknown = set(config.semantic_attention) - set(SEMANTIC_ATTENTION_KINDS)
    if unknown:
        raise ValueError(f"`semantic_attention` values must be in {SEMANTIC_ATTENTION_KINDS}, got {sorted(unknown)}.")
    blocks = list(config.num_semantic_blocks)
    if any(count < 0 for count in blocks) or (any(blocks) and not all(blocks)):
        raise ValueError(
            "`num_semantic_blocks` must be positive for every stage (SeMask) or 0 for every stage "
            f"({plain_model}); got {blocks}."
        )
    if config.semantic_window_size < 1:
        raise ValueError(f"`semantic_window_size` must be positive, got {config.semantic_window_size}.")
    if config.loss_reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"`loss_reduction` must be one of {LOSS_REDUCTIONS}, got {config.loss_reduction!r}.")


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
    Segmentation"): a Swin encoder whose stages end with semantic layers, and the semantic-FPN decode head. The
    defaults describe SeMask-T with the semantic-FPN head; use [`SemaskConfig.from_preset`] for the released models.
    The Swin arguments are named as in [`SwinConfig`].

    Args:
        image_size (`int`, *optional*, defaults to 224):
            The pre-training image size; it only sizes the absolute position embedding.
        patch_size (`int`, *optional*, defaults to 4):
            The size (resolution) of each patch.
        num_channels (`int`, *optional*, defaults to 3):
            The number of input channels.
        embed_dim (`int`, *optional*, defaults to 96):
            Dimensionality of the patch embedding (the width of the first stage; each later stage doubles it).
        depths (`list[int]`, *optional*, defaults to `[2, 2, 6, 2]`):
            Number of Swin blocks in each stage of the encoder.
        num_heads (`list[int]`, *optional*, defaults to `[3, 6, 12, 24]`):
            Number of attention heads in each stage of the encoder.
        window_size (`int`, *optional*, defaults to 7):
            Size of the (shifted) attention windows of the Swin blocks.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            Ratio of MLP hidden dimensionality to embedding dimensionality.
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether a learnable bias is added to the queries, keys and values.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            The dropout probability of the embeddings and the encoder's fully connected layers (the original
            `drop_rate`).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            The dropout ratio of the attention probabilities.
        drop_path_rate (`float`, *optional*, defaults to 0.3):
            Stochastic depth rate.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            The non-linear activation function in the encoder.
        use_absolute_embeddings (`bool`, *optional*, defaults to `False`):
            Whether to add absolute position embeddings to the patch embeddings (the original `ape`).
        patch_norm (`bool`, *optional*, defaults to `True`):
            Whether to apply a LayerNorm after the patch embedding.
        layer_norm_eps (`float`, *optional*, defaults to 1e-05):
            The epsilon used by the layer normalization layers.
        initializer_range (`float`, *optional*, defaults to 0.02):
            The standard deviation of the truncated_normal_initializer for initializing all weight matrices.
        semantic_window_size (`int`, *optional*, defaults to 7):
            Window size of the windowed semantic attention (never shifted). The semantic layers come after the Swin
            blocks of every stage.
        num_semantic_blocks (`list[int]`, *optional*, defaults to `[1, 1, 1, 1]`):
            Number of semantic attention blocks in each stage; all 0 gives a plain Swin-FPN.
        semantic_attention (`list[str]`, *optional*):
            Per stage, `"windowed"` or `"global"` semantic attention. When unset (`None`, the default), the config
            applies the original SeMask-FPN rule from `embed_dim` and the label count
            (`semask.presets.fpn_semantic_attention`).
        semantic_dropout_prob (`float`, *optional*, defaults to 0.1):
            The dropout probability on the semantic attention output (0.1 in the original).
        decoder_hidden_size (`int`, *optional*, defaults to 256):
            The number of channels of the semantic-FPN scale heads (the original `channels`).
        classifier_dropout_prob (`float`, *optional*, defaults to 0.1):
            The Dropout2d probability before the classifier (the original `dropout_ratio`).
        semantic_loss_weight (`float`, *optional*, defaults to 0.4):
            The weight of the semantic-branch loss (the original `cate_w`).
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
            The label value ignored by both losses.
        loss_reduction (`str`, *optional*, defaults to `"all_pixels"`):
            How each cross-entropy is averaged: `"all_pixels"` divides by all pixels, ignored ones included, as
            mmsegmentation 0.x does (the original training objective); `"valid_pixels"` divides by the non-ignored
            pixels, as `torch.nn.CrossEntropyLoss` does.
        align_corners (`bool`, *optional*, defaults to `False`):
            The `align_corners` of every bilinear resize in the head and the losses.
        out_features (`list[str]`, *optional*):
            If used as backbone, list of features to output. Can be any of `"stem"`, `"stage1"`, `"stage2"`, etc.
            (depending on how many stages the model has). If unset and `out_indices` is unset, every stage
            (`"stage1"` to `"stageN"`) is output.
        out_indices (`list[int]`, *optional*):
            If used as backbone, list of indices of features to output. Can be any of 0, 1, 2, etc. (depending on
            how many stages the model has; 0 is the stem). If unset and `out_features` is unset, every stage is
            output.

    Example:

    ```python
    >>> from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskModel

    >>> # Initializing a SeMask-T (semantic-FPN) style configuration
    >>> configuration = SemaskConfig()

    >>> # Initializing a model (with random weights) from the SeMask-T style configuration
    >>> model = SemaskModel(configuration)

    >>> # Accessing the model configuration
    >>> configuration = model.config

    >>> # The configuration of a released model, with its semantic-FPN head (random weights)
    >>> configuration = SemaskConfig.from_preset("semask-tiny-fpn-ade20k")
    >>> model = SemaskForSemanticSegmentation(configuration)
    ```"""

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
    semantic_attention: list[str] | tuple[str, ...] | None = None
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
        fill_label2id(self)
        if self.semantic_attention is None:
            self.semantic_attention = fpn_semantic_attention(self.embed_dim, self.num_labels, self.num_layers)

    @property
    def has_semantic_layers(self) -> bool:
        """Whether the stages end with semantic layers (False for the plain Swin-FPN baseline)."""
        return any(self.num_semantic_blocks)

    def validate_architecture(self):
        super().validate_architecture()
        check_per_stage(
            len(self.depths),
            num_heads=self.num_heads,
            num_semantic_blocks=self.num_semantic_blocks,
            semantic_attention=self.semantic_attention,
        )
        check_stage_heads([self.embed_dim * 2**index for index in range(len(self.depths))], self.num_heads)
        check_semantic_settings(self, plain_model="plain Swin-FPN")
        check_class_ids(self.id2label)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "SemaskConfig":
        """The configuration of a released SeMask-FPN model, e.g. ``"semask-tiny-fpn-ade20k"``.

        Available names are in `SemaskConfig.preset_names`; keyword arguments override preset values.
        """
        return cls(**{**fpn_preset(name), **overrides})


class SemaskEncoderConfigMixin:
    """What the configs of models on a SeMask-Swin encoder (`backbone_config`, a `SemaskConfig`) share: the encoder
    built from a `dict` or by default, the original semantic-attention rule of the variant (`semantic_attention_rule`)
    where the encoder leaves it unset, one label set for encoder and decoder, the checks of both, and presets whose
    `backbone_config` overrides merge into the preset's encoder settings (`preset_settings`)."""

    def semantic_attention_rule(self) -> tuple[str, ...]:
        """The variant's per-stage semantic attention kinds (the original code's rule)."""
        raise NotImplementedError

    @staticmethod
    def preset_settings(name: str) -> dict:
        """The config arguments of the released model `name`."""
        raise NotImplementedError

    def __post_init__(self, **kwargs):
        # Built here rather than by transformers' config, which resolves backbone dicts through its own config
        # mapping (that does not know "semask" in a remote-code process).
        apply_rule = self.backbone_config is None or (
            isinstance(self.backbone_config, dict) and self.backbone_config.get("semantic_attention") is None
        )
        if isinstance(self.backbone_config, dict):
            self.backbone_config = SemaskConfig.from_dict(self.backbone_config)
        elif self.backbone_config is None:
            self.backbone_config = SemaskConfig()
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = self.backbone_config.id2label
        super().__post_init__(**kwargs)
        fill_label2id(self)
        self.id2label, self.label2id = self.id2label, self.label2id  # shared with the encoder (`__setattr__`)
        if apply_rule:
            self.backbone_config.semantic_attention = self.semantic_attention_rule()

    @property
    def has_semantic_layers(self) -> bool:
        """Whether the encoder's stages end with semantic layers (whose priors feed the semantic head)."""
        return self.backbone_config.has_semantic_layers

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # The encoder's semantic layers always predict this config's classes, however the labels are set
        # (e.g. `from_pretrained(..., id2label=...)` assigns them after `__post_init__`).
        if name in ("id2label", "label2id") and isinstance(getattr(self, "backbone_config", None), SemaskConfig):
            setattr(self.backbone_config, name, None if value is None else dict(value))

    def validate_architecture(self):
        super().validate_architecture()
        check_class_ids(self.id2label)
        backbone = self.backbone_config
        if backbone.num_labels != self.num_labels:
            raise ValueError(
                f"The encoder's semantic layers predict {backbone.num_labels} classes but the decoder "
                f"{self.num_labels}; both use this config's label set."
            )
        if self.size_divisibility % backbone.patch_size:
            raise ValueError(
                f"`size_divisibility` ({self.size_divisibility}) must be a multiple of the patch size "
                f"({backbone.patch_size}), so that predictions are exactly {backbone.patch_size} times smaller."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """The configuration of a released model (`cls.preset_names`); keyword arguments override preset values
        (`backbone_config` overrides are merged into the preset's encoder settings)."""
        preset = cls.preset_settings(name)
        backbone = {**preset.pop("backbone_config"), **overrides.pop("backbone_config", {})}
        return cls(**{**preset, **overrides, "backbone_config": backbone})


__all__ = ["SemaskConfig"]
