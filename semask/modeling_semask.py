"""PyTorch SeMask: a Swin encoder whose stages end with semantic layers, and the semantic-FPN decode head.

The Swin blocks, patch embedding and patch merging are transformers' own Swin modules (so ImageNet Swin weights
load by name); this file adds the semantic layers, the per-stage output norms, the semantic-FPN head and the losses.
"""

import functools
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.models.swin.modeling_swin import (
    SwinAttention,
    SwinLayer,
    SwinPatchEmbeddings,
    SwinPatchMerging,
    SwinRelativePositionBias,
    eager_attention_forward,
    window_partition,
    window_reverse,
)
from transformers.models.upernet.modeling_upernet import UperNetConvModule
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_semask import SemaskConfig, settings_equal
from .sizes import padded_to, round_up, sizes_differ

logger = logging.get_logger(__name__)

# Swin hyper-parameters that fix the shapes of the encoder weights.
SWIN_ARCHITECTURE_KEYS = (
    "image_size",
    "patch_size",
    "num_channels",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "use_absolute_embeddings",
    "hidden_act",
    "layer_norm_eps",
)

# transformers' attention functions, as the SeMask modules look them up: an instance of transformers'
# `AttentionInterface` whose local mapping `cpu_inference` gives its CPU-inference SDPA (for no other model).
ALL_ATTENTION_FUNCTIONS = AttentionInterface()

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_semask.SemaskConfig",
    "AutoModel": "modeling_semask.SemaskModel",
    "AutoModelForSemanticSegmentation": "modeling_semask.SemaskForSemanticSegmentation",
    "AutoBackbone": "modeling_semask.SemaskBackbone",
}


@dataclass
class SemaskModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Output of the last stage after its output norm, as a token sequence.
    feature_maps (`tuple(torch.FloatTensor)`):
        One map per stage, `(batch_size, embed_dim * 2**i, height_i, width_i)`: the stage output after its
        semantic layer and output norm (the original backbone's outputs).
    semantic_priors (`tuple(torch.FloatTensor)`):
        One map per stage, `(batch_size, num_labels, height_i, width_i)`: the class-query projection of the
        stage's last semantic block (pre-softmax). `None` without semantic layers.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The patch embeddings and each stage's output stream (before its output norm and patch merging), as
        `(batch_size, height_i * width_i, channels_i)` token sequences.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` in eager mode):
        Window attention weights of every Swin block, `(batch_size * num_windows, num_heads, window_area, window_area)`.
    semantic_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_semantic_attentions=True`
    in eager mode):
        Attention weights of every semantic block, `(batch_size * num_windows, 1, tokens, tokens)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    semantic_priors: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    semantic_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SemaskSemanticSegmenterOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        Cross-entropy of the upsampled logits plus `semantic_loss_weight` times the cross-entropy of the upsampled
        semantic logits (reduction: `config.loss_reduction`).
    logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / 4, width / 4)`):
        Segmentation logits at stride 4. Upsample them to the image size before taking the argmax.
    semantic_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height / 4, width / 4)`):
        The semantic branch: the semantic priors of all stages upsampled to stride 4 and summed.
    semantic_priors, hidden_states, attentions, semantic_attentions:
        As in [`SemaskModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    semantic_logits: torch.FloatTensor | None = None
    semantic_priors: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    semantic_attentions: tuple[torch.FloatTensor, ...] | None = None


def tokens_to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(batch, height * width, channels) tokens as a (batch, channels, height, width) map, without a copy.

    The map is channels-last in memory: the layout the head's convolutions and resizes are fastest with on CPUs.
    """
    return tokens.unflatten(1, size).permute(0, 3, 1, 2)


def pad_bottom_right(
    tensor: torch.Tensor, padded_size: tuple[int, int], value: float = 0.0, channels_last: bool = False
) -> torch.Tensor:
    """`tensor` padded with `value` on the bottom / right to `padded_size`: its last two dimensions are (height,
    width), or the two before the last with `channels_last` ((batch, height, width, channels) maps)."""
    size = tensor.shape[-3:-1] if channels_last else tensor.shape[-2:]
    if not sizes_differ(size, padded_size):
        return tensor
    pad = (0, padded_size[1] - size[1], 0, padded_size[0] - size[0])
    return F.pad(tensor, (0, 0, *pad) if channels_last else pad, value=value)


def crop_map(hidden_states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (batch, height, width, channels) map cropped to its top-left `size`, as a contiguous tensor."""
    if not sizes_differ(hidden_states.shape[1:3], size):
        return hidden_states
    # a copy rather than .contiguous(), which would ask whether the (symbolic) crop happens to be contiguous
    return hidden_states[:, : size[0], : size[1]].clone(memory_format=torch.contiguous_format)


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int) -> None:
    """Raise a ValueError unless `pixel_values` is a (batch_size, num_channels, height, width) batch, a TypeError
    unless it is floating point."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"Expected pixel_values of shape (batch_size, {num_channels}, height, width), "
            f"got {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be floating point (the image processor's normalised output), got "
            f"{pixel_values.dtype}; pass the images through the image processor first."
        )


def warn_unless_eager(config: PreTrainedConfig, kwargs: dict) -> None:
    """Warn (once) when attention weights are asked for but the attention implementation does not return them."""
    wants_attentions = kwargs.get("output_attentions") or kwargs.get("output_semantic_attentions")
    if wants_attentions and config._attn_implementation != "eager":
        logger.warning_once(
            f"Attention weights are only returned with eager attention, not {config._attn_implementation!r}: "
            "call `model.set_attn_implementation('eager')` first."
        )


class SemaskEmbeddings(nn.Module):
    """Patch embedding (padded to a multiple of the patch size), optional norm and absolute position embedding."""

    def __init__(self, config: SemaskConfig):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_embeddings = SwinPatchEmbeddings(config)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps) if config.patch_norm else None
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, self.patch_embeddings.num_patches, config.embed_dim))
            if config.use_absolute_embeddings
            else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        check_pixel_values(pixel_values, self.num_channels)
        size = pixel_values.shape[-2:]
        padded_size = tuple(round_up(length, patch) for length, patch in zip(size, self.patch_embeddings.patch_size))
        pixel_values = pad_bottom_right(pixel_values, padded_size)
        embeddings, size = self.patch_embeddings(pixel_values)
        if self.norm is not None:
            embeddings = self.norm(embeddings)
        if self.position_embeddings is not None:
            embeddings = embeddings + self.resized_position_embeddings(size)
        return self.dropout(embeddings), size

    def resized_position_embeddings(self, size: tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding resized (bicubic) to the patch grid, as the original always does."""
        grid = tokens_to_map(self.position_embeddings, self.patch_embeddings.grid_size)
        return F.interpolate(grid, size=size, mode="bicubic").flatten(2).transpose(1, 2)


class SemaskSemanticAttention(nn.Module):
    """One semantic attention block: single-head attention whose queries and keys are class scores.

    `x + gamma * dropout(o_proj(softmax(q kᵀ) v))` with `q, k, v` linear projections of `x`; `q` (one channel per
    class) is the block's semantic prior. The softmax has no 1/sqrt(d) scaling and runs in float32, also under
    autocast.
    """

    def __init__(self, config: SemaskConfig, dim: int):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.q_proj = nn.Linear(dim, config.num_labels)
        self.k_proj = nn.Linear(dim, config.num_labels)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(config.semantic_dropout_prob)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(windows, tokens, dim) tokens → the new tokens, the prior (windows, tokens, num_labels) and, in eager
        mode, the attention weights (windows, 1, tokens, tokens)."""
        prior, key, value = self.project(hidden_states)
        attn_output, attn_weights = self.attend(prior, key, value)
        return self.add_output(hidden_states, attn_output), prior, attn_weights

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`softmax(query keyᵀ) value` in float32, as one head of the configured attention implementation."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        with torch.autocast(device_type=value.device.type, enabled=False):
            query, key, one_head_value = (tensor.float().unsqueeze(1) for tensor in (query, key, value))
            output, weights = attention_interface(self, query, key, one_head_value, None, dropout=0.0, scaling=1.0)
        return output.reshape(value.shape).to(value.dtype), weights

    def add_output(self, hidden_states: torch.Tensor, attn_output: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.gamma * self.dropout(self.o_proj(attn_output))


class SemaskSemanticBlocks(GradientCheckpointingLayer):
    """Semantic attention blocks over non-shifted windows (or over all tokens when global).

    Windowed mode pads the map right/bottom to a multiple of the window; padded tokens are not masked. Returns the
    new token stream and the last block's prior map.
    """

    def __init__(self, config: PreTrainedConfig, dim: int, num_blocks: int, window_size: int | None):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList([SemaskSemanticAttention(config, dim) for _ in range(num_blocks)])
        self.window_size = window_size

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window_size is not None:
            hidden_states = self._partition_windows(hidden_states, size)
        for block in self.blocks:
            hidden_states, prior, _ = block(hidden_states)
        if self.window_size is not None:
            hidden_states = self._merge_windows(hidden_states, size)
            prior = self._merge_windows(prior, size)
        return hidden_states, tokens_to_map(prior, size)

    def _partition_windows(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        batch_size, _, channels = hidden_states.shape
        window = self.window_size
        hidden_states = hidden_states.view(batch_size, *size, channels)
        hidden_states = pad_bottom_right(hidden_states, padded_to(size, window), channels_last=True)
        return window_partition(hidden_states, window).view(-1, window * window, channels)

    def _merge_windows(self, windows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        window, channels = self.window_size, windows.shape[-1]
        padded_size = padded_to(size, window)
        merged = window_reverse(windows.view(-1, window, window, channels), window, *padded_size)
        return crop_map(merged, size).view(merged.shape[0], size[0] * size[1], channels)


class SemaskSemanticLayer(SemaskSemanticBlocks):
    """The semantic layer of a SeMask-Swin stage: LayerNorm, then the semantic attention blocks; the new token
    stream starts from the normed input."""

    def __init__(self, config: SemaskConfig, dim: int, num_blocks: int, window_size: int | None):
        super().__init__(config, dim, num_blocks, window_size)
        self.layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(self.layernorm(hidden_states), size)


class SemaskSwinAttention(SwinAttention):
    """transformers' `SwinAttention` (same weights and computation), attending through `ALL_ATTENTION_FUNCTIONS`.

    The relative-position bias and the shift mask are added to the scores as one (windows, heads, tokens, tokens)
    mask, built per window of one image and only expanded (without a copy for one image) to the batch.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        windows, tokens, channels = hidden_states.shape
        heads_shape = (windows, tokens, self.num_attention_heads, self.head_dim)
        query, key, value = (
            projection(hidden_states).view(heads_shape).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        mask = self.relative_position_bias()  # (1, heads, tokens, tokens)
        if attention_mask is not None:  # the shift mask, (windows per image, tokens, tokens)
            mask = mask + attention_mask.unsqueeze(1)
            mask = mask.expand(windows // mask.shape[0], *mask.shape).reshape(windows, *mask.shape[1:])
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(windows, tokens, channels)), weights


class SemaskSwinLayer(SwinLayer):
    """transformers' `SwinLayer` (same weights and computation) with windows that always partition the map (a window
    larger than the map is padded, never shrunk, as in the original) and no branch on the map size (for
    torch.export)."""

    def __init__(
        self, config: SemaskConfig, dim: int, num_heads: int, drop_path_rate: float = 0.0, shift_size: int = 0
    ):
        super().__init__(config, dim, None, num_heads, drop_path_rate=drop_path_rate, shift_size=shift_size)
        self.attention = SemaskSwinAttention(config, dim, num_heads, window_size=config.window_size)

    def forward(
        self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size, window = input_dimensions, self.window_size
        batch_size, _, channels = hidden_states.shape
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states).view(batch_size, *size, channels)
        hidden_states = pad_bottom_right(hidden_states, padded_to(size, window), channels_last=True)
        padded_size = hidden_states.shape[1:3]
        windows = window_partition(self.cyclic_shift(hidden_states), window).view(-1, window * window, channels)
        attn_mask = self.get_attn_mask(*padded_size, dtype=hidden_states.dtype, device=windows.device)
        attention_output, attn_weights = self.attention(windows, attn_mask, **kwargs)
        attention_windows = self.dropout(attention_output).view(-1, window, window, channels)
        attention_windows = self.cyclic_shift(window_reverse(attention_windows, window, *padded_size), reverse=True)
        attention_output = crop_map(attention_windows, size).view(batch_size, size[0] * size[1], channels)
        hidden_states = self.add_attention(shortcut, attention_output)
        return self.add_mlp(hidden_states), attn_weights

    def add_attention(self, shortcut: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        return shortcut + self.drop_path(attention_output)

    def add_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))


class SemaskPatchMerging(SwinPatchMerging):
    """transformers' `SwinPatchMerging` with no branch on the map size while exporting."""

    def maybe_pad(self, input_feature: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return pad_bottom_right(input_feature, padded_to((height, width), 2), channels_last=True)


class SemaskStage(nn.Module):
    """Swin blocks (alternately shifted), the semantic layer, then patch merging for the next stage."""

    def __init__(self, config: SemaskConfig, index: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.embed_dim * 2**index
        self.blocks = nn.ModuleList(
            [
                SemaskSwinLayer(
                    config,
                    dim,
                    num_heads=config.num_heads[index],
                    drop_path_rate=rate,
                    shift_size=0 if block_index % 2 == 0 else config.window_size // 2,
                )
                for block_index, rate in enumerate(drop_path_rates)
            ]
        )
        num_semantic_blocks = config.num_semantic_blocks[index]
        windowed = config.semantic_attention[index] == "windowed"
        self.semantic_layer = (
            SemaskSemanticLayer(config, dim, num_semantic_blocks, config.semantic_window_size if windowed else None)
            if num_semantic_blocks
            else None
        )
        self.downsample = SemaskPatchMerging(dim) if index < config.num_layers - 1 else None

    def forward(
        self, hidden_states: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Returns the stage output, its semantic prior map (or None) and the input of the next stage."""
        for block in self.blocks:
            hidden_states, _ = block(hidden_states, size)
        prior = None
        if self.semantic_layer is not None:
            hidden_states, prior = self.semantic_layer(hidden_states, size)
        next_hidden_states = self.downsample(hidden_states, size) if self.downsample is not None else hidden_states
        return hidden_states, prior, next_hidden_states


class SemaskEncoder(nn.Module):
    """The stages, named like Swin's encoder (`encoder.layers.{i}.blocks.{j}`) so Swin weights load by name."""

    def __init__(self, config: SemaskConfig):
        super().__init__()
        total_depth = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]
        starts = [sum(config.depths[:index]) for index in range(config.num_layers)]
        self.layers = nn.ModuleList(
            [
                SemaskStage(config, index, rates[start : start + depth])
                for index, (start, depth) in enumerate(zip(starts, config.depths))
            ]
        )


def load_swin(swin_model_name_or_path: str) -> PreTrainedModel:
    """A transformers Swin checkpoint (`SwinModel`, `SwinBackbone` or `SwinForImageClassification`); a ValueError
    for other model types."""
    swin = AutoModel.from_pretrained(swin_model_name_or_path)
    if swin.config.model_type != "swin":
        raise ValueError(f"Expected a Swin checkpoint, got model_type {swin.config.model_type!r}.")
    return swin


def swin_encoder_settings(swin_config: PreTrainedConfig, **config_kwargs) -> dict:
    """`SemaskConfig` keyword arguments for an encoder on a Swin checkpoint: its architecture, a semantic window
    equal to the Swin window, then `config_kwargs`; a ValueError where these contradict the architecture."""
    swin_arch = {key: getattr(swin_config, key) for key in SWIN_ARCHITECTURE_KEYS}
    conflicts = {
        key: value
        for key, value in config_kwargs.items()
        if key in swin_arch and not settings_equal(value, swin_arch[key])
    }
    if conflicts:
        raise ValueError(f"These settings contradict the Swin checkpoint's architecture {swin_arch}: {conflicts}.")
    return {**swin_arch, "semantic_window_size": swin_arch["window_size"], **config_kwargs}


class SemaskPreTrainedModel(PreTrainedModel):
    config: SemaskConfig
    base_model_prefix = "semask"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SemaskStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SemaskStage, index=0, capture_initial_hidden_state=True),
        "attentions": OutputRecorder(SwinLayer, index=1, capture_initial_hidden_state=False),
        "semantic_attentions": OutputRecorder(SemaskSemanticAttention, index=2, capture_initial_hidden_state=False),
    }
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index"]

    def post_init(self) -> None:
        super().post_init()
        with_remote_code_auto_map(self.config, REMOTE_CODE_AUTO_MAP)
        from .cpu_inference import use_cpu_inference_kernels

        use_cpu_inference_kernels(self)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SwinRelativePositionBias):
            init.trunc_normal_(module.relative_position_bias_table, std=0.02)
            init.copy_(module.relative_position_index, module._create_relative_position_index().view(-1))
        elif isinstance(module, SemaskEmbeddings) and module.position_embeddings is not None:
            init.trunc_normal_(module.position_embeddings, std=0.02)
        elif isinstance(module, SemaskSemanticAttention):
            # gamma = 0 makes a fresh semantic layer return LayerNorm(x). o_proj keeps the normal Linear init
            # (as the original's backbone init leaves it): zeroing both would leave neither a gradient.
            init.zeros_(module.gamma)

    @classmethod
    def from_swin_pretrained(
        cls, swin_model_name_or_path: str, output_loading_info: bool = False, **config_kwargs
    ) -> "SemaskPreTrainedModel | tuple[SemaskPreTrainedModel, dict[str, list[str]]]":
        """A SeMask model whose Swin encoder comes from a transformers Swin checkpoint (how SeMask is trained).

        Args:
            swin_model_name_or_path (`str`):
                A folder or Hub id saved from `SwinModel`, `SwinBackbone` or `SwinForImageClassification` (e.g.
                ``microsoft/swin-tiny-patch4-window7-224``). The Swin architecture comes from its config.
            output_loading_info (`bool`, *optional*, defaults to `False`):
                Also return `{"missing_keys": [...], "unexpected_keys": [...]}`: the weights that were not loaded
                and the checkpoint weights that were not used (both are logged).
            config_kwargs:
                The other `SemaskConfig` settings (labels, semantic layers, head). `semantic_window_size` defaults
                to the Swin window. Semantic layers, output norms and the decode head are freshly initialised.
        """
        swin = load_swin(swin_model_name_or_path)
        model = cls(SemaskConfig(**swin_encoder_settings(swin.config, **config_kwargs)))
        info = model.load_swin_weights(swin, swin_model_name_or_path)
        model.eval()
        return (model, info) if output_loading_info else model

    def load_swin_weights(self, swin: PreTrainedModel, source: str) -> dict[str, list[str]]:
        """Load a transformers Swin model's weights into this model's encoder (matching names); log and return the
        weights left as they were (`missing_keys`) and the Swin weights not used (`unexpected_keys`)."""
        swin_state = swin.state_dict()
        unused = self.base_model.load_state_dict(swin_state, strict=False).unexpected_keys
        prefix = f"{self.base_model_prefix}." if self.base_model is not self else ""
        loaded = {prefix + key for key in swin_state}
        info = {"missing_keys": [key for key in self.state_dict() if key not in loaded], "unexpected_keys": unused}
        logger.warning(
            "Initialised %s from the Swin weights of %s. Newly initialised: %s. Unused checkpoint weights: %s.",
            type(self).__name__,
            source,
            summarize_keys(info["missing_keys"]),
            summarize_keys(info["unexpected_keys"]) or "none",
        )
        return info


def with_remote_code_auto_map(config: PreTrainedConfig, auto_map: dict[str, str]) -> None:
    """Name every class of the model's remote code in `config.auto_map` (keeping entries already there), so one saved
    folder serves all Auto classes with `trust_remote_code=True`."""
    config.auto_map = {**auto_map, **(getattr(config, "auto_map", None) or {})}


def summarize_keys(keys: list[str]) -> str:
    """Parameter names with layer indices folded into `*`, e.g. ``encoder.layers.*.semantic_layer.layernorm.weight``."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", key)) for key in keys}))


class SemaskModel(SemaskPreTrainedModel):
    """The SeMask-Swin encoder: per-stage feature maps and semantic prior maps."""

    def __init__(self, config: SemaskConfig):
        super().__init__(config)
        self.embeddings = SemaskEmbeddings(config)
        self.encoder = SemaskEncoder(config)
        self.hidden_states_norms = nn.ModuleDict(
            {
                name: nn.LayerNorm(config.embed_dim * 2**index, eps=config.layer_norm_eps)
                for index, name in enumerate(config.stage_names[1:])
            }
        )
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> SemaskModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded right/bottom to a multiple of the patch size.
        output_hidden_states (`bool`, *optional*):
            Return each stage's token stream in `hidden_states`.
        output_attentions (`bool`, *optional*):
            Return the window attention weights in `attentions` (eager attention only).
        output_semantic_attentions (`bool`, *optional*):
            Return the semantic attention weights in `semantic_attentions` (eager attention only).
        """
        warn_unless_eager(self.config, kwargs)
        hidden_states, size = self.embeddings(pixel_values)
        feature_maps, priors = (), ()
        for norm, stage in zip(self.hidden_states_norms.values(), self.encoder.layers):
            stage_output, prior, hidden_states = stage(hidden_states, size)
            last_hidden_state = norm(stage_output)
            feature_maps += (tokens_to_map(last_hidden_state, size),)
            if prior is not None:
                priors += (prior,)
            size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        return SemaskModelOutput(
            last_hidden_state=last_hidden_state, feature_maps=feature_maps, semantic_priors=priors or None
        )


def sum_of_upsampled_priors(priors: tuple[torch.Tensor, ...], align_corners: bool) -> torch.Tensor:
    """The semantic branch of both heads: the sum of the priors, prior i upsampled x2 (bilinear) i times and resized
    to the first prior's size where odd sizes make them differ.

    When each prior is exactly half the size of the one before, the sum is accumulated coarse to fine,
    `p0 + up(p1 + up(p2 + up(p3)))`: upsampling is linear, so this is the same sum (up to float rounding) with
    half the upsampling.
    """
    upsample = functools.partial(F.interpolate, scale_factor=2, mode="bilinear", align_corners=align_corners)
    sizes = [prior.shape[-2:] for prior in priors]
    if not any(sizes_differ(big, (2 * small[0], 2 * small[1])) for big, small in zip(sizes, sizes[1:])):
        total = priors[-1]
        for prior in reversed(priors[:-1]):
            total = upsample(total).add_(prior)  # (in place: upsampling's backward does not need its output)
        return total
    upsampled = []
    for index, prior in enumerate(priors):
        for _ in range(index):
            prior = upsample(prior)
        upsampled.append(prior)
    return sum_at_first_size(upsampled, align_corners)


def sum_at_first_size(maps: list[torch.Tensor], align_corners: bool) -> torch.Tensor:
    """The sum of `maps`, each resized (bilinear) to the first one's size where it differs."""
    output = maps[0]
    for feature_map in maps[1:]:
        if sizes_differ(feature_map.shape[-2:], output.shape[-2:]):
            feature_map = F.interpolate(
                feature_map, size=output.shape[-2:], mode="bilinear", align_corners=align_corners
            )
        output = output + feature_map
    return output


class SemaskFPNHead(nn.Module):
    """The original BranchFPNHead: semantic FPN over the stage features, plus a parameter-free semantic branch.

    Stage i passes through max(1, i) blocks of Conv3x3-BN-ReLU, each followed by a x2 bilinear upsample when
    i > 0; the semantic branch upsamples stage i's prior x2, i times. Each branch sums its maps at stride 4
    (resizing when odd input sizes make them differ); the FPN sum then goes through Dropout2d and a 1x1 classifier.
    Upsampling is linear, so maps about to be upsampled from one size are summed first and upsampled once: the same
    sums up to float rounding, with fewer full-size maps.
    With gradient checkpointing, each stage's convolution chain is recomputed in the backward pass.
    """

    gradient_checkpointing = False

    def __init__(self, config: PreTrainedConfig, in_channels: Sequence[int] | None = None):
        """`in_channels`: the widths of the stage features (default: SeMask-Swin's, `embed_dim * 2**i`)."""
        super().__init__()
        if in_channels is None:
            in_channels = [config.embed_dim * 2**index for index in range(config.num_layers)]
        self.align_corners = config.align_corners
        self.scale_heads = nn.ModuleList(
            [
                self._scale_head(channels, config.decoder_hidden_size, index)
                for index, channels in enumerate(in_channels)
            ]
        )
        self.dropout = nn.Dropout2d(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, kernel_size=1)

    def _scale_head(self, in_channels: int, channels: int, index: int) -> nn.Sequential:
        layers = []
        for step in range(max(1, index)):
            layers.append(UperNetConvModule(in_channels if step == 0 else channels, channels, 3, padding=1))
            if index > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=self.align_corners))
        return nn.Sequential(*layers)

    def forward(
        self, feature_maps: tuple[torch.Tensor, ...], semantic_priors: tuple[torch.Tensor, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.classifier(self.dropout(self._fpn_sum(feature_maps)))
        if semantic_priors is None:
            return logits, None
        return logits, sum_of_upsampled_priors(semantic_priors, self.align_corners)

    def _fpn_sum(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The scale heads' outputs summed at the first one's size.

        The heads after the first end with the same x2 upsample: when their maps before it share a size (always
        but for some odd input sizes), these maps are summed and upsampled once.
        """
        run = functools.partial(checkpointed, self, restore_batch_norm_statistics=True)
        first = run(self.scale_heads[0], feature_maps[0])
        heads = self.scale_heads[1:]
        before_upsample = [run(head[:-1], x) for head, x in zip(heads, feature_maps[1:])]
        if not before_upsample:
            return first
        if sizes_differ(*(x.shape[-2:] for x in before_upsample)):
            upsampled = [head[-1](x) for head, x in zip(heads, before_upsample)]
            return sum_at_first_size([first, *upsampled], self.align_corners)
        upsampled = heads[0][-1](sum_at_first_size(before_upsample, self.align_corners))
        if sizes_differ(upsampled.shape[-2:], first.shape[-2:]):
            return sum_at_first_size([first, upsampled], self.align_corners)
        return upsampled.add_(first)  # (in place: upsampling's backward does not need its output)


def checkpointed(
    owner: nn.Module, function: Callable, *args: torch.Tensor, restore_batch_norm_statistics: bool = False
) -> torch.Tensor:
    """`function(*args)`, recomputed in the backward pass when `owner` trains with gradient checkpointing.

    With `restore_batch_norm_statistics`, the batch-norm running statistics of `function` (a module) are put back
    after the recomputation, so each training step updates them once (compiled graphs recompute without mutating
    them again).
    """
    if not (owner.gradient_checkpointing and owner.training):
        return function(*args)
    if not restore_batch_norm_statistics or torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False)
    context_fn = lambda: (nullcontext(), running_statistics_restored(function))  # noqa: E731
    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)


@contextmanager
def running_statistics_restored(module: nn.Module) -> Iterator[None]:
    """Batch-norm running statistics in `module` are put back as they were when the block exits."""
    saved = [
        (buffer, buffer.clone())
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
        for buffer in norm.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def check_label_maps(labels: torch.Tensor, pixel_values: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    """Raise a ValueError unless labels are (batch_size, H, W) integers, at the images' size, in [0, num_labels) or
    `ignore_index`."""
    batch_size, _, height, width = pixel_values.shape
    if labels.ndim != 3 or labels.shape[0] != batch_size or labels.is_floating_point():
        raise ValueError(
            f"Expected integer labels of shape ({batch_size}, height, width), got {labels.dtype} {tuple(labels.shape)}."
        )
    if labels.shape[-2:] != (height, width):
        raise ValueError(
            f"`labels` are {labels.shape[-2]}x{labels.shape[-1]} (HxW) but the images {height}x{width}; pass label "
            "maps at the size of `pixel_values` (the image processor resizes and pads both alike)."
        )
    invalid = (labels != ignore_index) & ((labels < 0) | (labels >= num_labels))
    message = f"Labels must lie in [0, {num_labels}) or equal the ignore index {ignore_index}"
    if torch.compiler.is_compiling():  # a graph cannot branch on data: a RuntimeError from inside the graph
        torch._assert_async(~invalid.any(), message)
    elif invalid.any():
        raise ValueError(f"{message}; found {labels[invalid].unique()[:10].tolist()}.")


class SemanticSegmentationMixin:
    """SeMask-FPN's forward, label checks and losses, for a model with a `config`, an encoder as its `base_model`
    (feature maps and semantic priors) and a `decode_head` (with gradient checkpointing on the head, the
    full-resolution losses are recomputed in the backward pass)."""

    # Trainer must not pass `num_items_in_batch`: the loss normalises itself (see `config.loss_reduction`).
    accepts_loss_kwargs = False

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> SemaskSemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth label maps with values in `[0, num_labels)` or `config.semantic_loss_ignore_index`.
        """
        if labels is not None:
            self.check_labels(labels, pixel_values)
        outputs = self.base_model(pixel_values, return_dict=True, **kwargs)  # not `config.return_dict`, shared
        logits, semantic_logits = self.decode_head(outputs.feature_maps, outputs.semantic_priors)
        loss = self.segmentation_loss(logits, semantic_logits, labels) if labels is not None else None
        return SemaskSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            semantic_logits=semantic_logits,
            semantic_priors=outputs.semantic_priors,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            semantic_attentions=outputs.semantic_attentions,
        )

    def segmentation_loss(
        self, logits: torch.Tensor, semantic_logits: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """The original's loss: the decode loss, plus the semantic loss where there is a semantic branch."""
        loss = self.decode_loss(logits, labels)
        if semantic_logits is not None:
            loss = loss + self.semantic_loss(semantic_logits, labels)
        return loss

    def check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError unless labels are (batch_size, H, W) integers at the images' size, in the label set or
        the ignore index."""
        check_label_maps(labels, pixel_values, self.config.num_labels, self.config.semantic_loss_ignore_index)

    def decode_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original's decode loss: cross-entropy of the logits resized (bilinear) to the label size."""
        return checkpointed(self.decode_head, self.cross_entropy, logits, labels)

    def semantic_loss(self, semantic_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The original's semantic loss: `semantic_loss_weight` x the cross-entropy of the resized semantic logits."""
        return self.config.semantic_loss_weight * checkpointed(
            self.decode_head, self.cross_entropy, semantic_logits, labels
        )

    def upsampled(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Stride-4 logits resized (bilinear) to `size`, as the losses resize them."""
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.config.align_corners)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the resized `logits` (the `ignore_index` pixels count 0), reduced by
        `config.loss_reduction`: over all pixels or over the valid ones (with gradient checkpointing the
        full-resolution logits are recomputed in the backward pass rather than kept).

        `F.cross_entropy`'s values, computed channels-last: the log-softmax runs over contiguous class scores and
        the full-resolution map is never copied into another layout.
        """
        logits = self.upsampled(logits.contiguous(memory_format=torch.channels_last), labels.shape[-2:])
        log_probabilities = logits.permute(0, 2, 3, 1).log_softmax(dim=-1)
        valid = labels != self.config.semantic_loss_ignore_index
        picked = log_probabilities.gather(-1, labels.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
        total = -picked.masked_fill(~valid, 0).sum()
        return total / (valid.sum() if self.config.loss_reduction == "valid_pixels" else labels.numel())


class SemaskForSemanticSegmentation(SemanticSegmentationMixin, SemaskPreTrainedModel):
    """SeMask-Swin with the semantic-FPN head (the original SeMask-FPN)."""

    def __init__(self, config: SemaskConfig):
        super().__init__(config)
        self.semask = SemaskModel(config)
        self.decode_head = SemaskFPNHead(config)
        self.post_init()


class SemaskBackbone(BackboneMixin, SemaskPreTrainedModel):
    """SeMask-Swin feature maps for other heads (e.g. `UperNetConfig(backbone_config=SemaskConfig(...))`)."""

    def __init__(self, config: SemaskConfig):
        super().__init__(config)
        self.num_features = [config.embed_dim] + [config.embed_dim * 2**index for index in range(config.num_layers)]
        self.semask = SemaskModel(config)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size.
        """
        outputs = self.semask(pixel_values, return_dict=True, **kwargs)  # not `config.return_dict`, shared
        maps = dict(zip(self.stage_names[1:], outputs.feature_maps))
        maps["stem"] = tokens_to_map(outputs.hidden_states[0], outputs.feature_maps[0].shape[-2:])
        return BackboneOutput(
            feature_maps=tuple(maps[name] for name in self.out_features),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "SemanticSegmentationMixin",
    "SemaskBackbone",
    "SemaskForSemanticSegmentation",
    "SemaskModel",
    "SemaskPreTrainedModel",
]
