"""PyTorch SeMask: a Swin encoder whose stages end with semantic layers, and the semantic-FPN decode head.

The Swin blocks, patch embedding and patch merging are transformers' own Swin modules (so ImageNet Swin weights
load by name); this file adds the semantic layers, the per-stage output norms, the semantic-FPN head and the losses.
"""

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
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
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_semask import SemaskConfig, settings_equal
from .fused_kernels import FusedConvModule, FusedLinear, linear, linear_gelu, paired_linear, use_fused_linears
from .presets import fpn_semantic_attention

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


def round_up(size: int, multiple: int) -> int:
    """`size` rounded up to a multiple of `multiple`, written so that torch.export sees that it divides evenly."""
    return (size + multiple - 1) // multiple * multiple


def needs_padding(size: tuple[int, int], padded_size: tuple[int, int]) -> bool:
    """Whether a map of `size` must be padded to `padded_size`.

    Always while exporting: sizes are symbolic there, and a branch on them would fix the exported graph to one
    case (padding by 0 changes nothing).
    """
    return torch.compiler.is_exporting() or tuple(size) != tuple(padded_size)


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
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch_size, {self.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        size = pixel_values.shape[-2:]
        padded_size = tuple(round_up(length, patch) for length, patch in zip(size, self.patch_embeddings.patch_size))
        if needs_padding(size, padded_size):
            pad = (0, padded_size[1] - size[1], 0, padded_size[0] - size[0])
            pixel_values = F.pad(pixel_values, pad)
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

    `softmax(q kᵀ)` has no 1/sqrt(d) scaling and is computed in float32 even under autocast. The output is
    `x + gamma * dropout(o_proj(attention(x)))`; `q` is the block's semantic prior.
    """

    def __init__(self, config: SemaskConfig, dim: int):
        super().__init__()
        self.config = config
        self.is_causal = False
        self.q_proj = FusedLinear(dim, config.num_labels)
        self.k_proj = FusedLinear(dim, config.num_labels)
        self.v_proj = FusedLinear(dim, dim)
        self.o_proj = FusedLinear(dim, dim)
        self.dropout = nn.Dropout(config.semantic_dropout_prob)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        prior, key = paired_linear(hidden_states, self.q_proj, self.k_proj)
        value = self.v_proj(hidden_states)
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            attn_output, attn_weights = self._attention(prior.float(), key.float(), value.float())
        attn_output = attn_output.to(value.dtype)
        if self.training:
            hidden_states = hidden_states + self.gamma * self.dropout(self.o_proj(attn_output))
        else:
            hidden_states = linear(attn_output, self.o_proj, residual=hidden_states, scale=self.gamma)
        return hidden_states, prior, attn_weights

    def _attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`softmax(query keyᵀ) value` over the tokens of (windows, tokens, width) inputs.

        Returns the output and, in eager mode, the weights as (windows, 1, tokens, tokens) (one head).

        The queries and keys (one channel per class) differ in width from the values, which leaves PyTorch's SDPA
        without a fused CPU kernel: its math fallback is slower than two matmuls, so on CPUs SDPA mode runs these.
        """
        eager = self.config._attn_implementation == "eager"
        if eager or query.device.type == "cpu":
            weights = torch.softmax(torch.bmm(query, key.transpose(1, 2)), dim=-1)
            return torch.bmm(weights, value), weights.unsqueeze(1) if eager else None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self, query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), None, dropout=0.0, scaling=1.0
        )
        return output.squeeze(2), weights


class SemaskSemanticLayer(GradientCheckpointingLayer):
    """LayerNorm, then semantic attention blocks over non-shifted windows (or over all tokens when global).

    Windowed mode pads the normed map right/bottom to a multiple of the window; padded tokens are not masked.
    Returns the new token stream (which starts from the normed input) and the last block's prior map.
    """

    def __init__(self, config: SemaskConfig, dim: int, num_blocks: int, window_size: int | None):
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([SemaskSemanticAttention(config, dim) for _ in range(num_blocks)])
        self.window_size = window_size

    def forward(self, hidden_states: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, _, channels = hidden_states.shape
        if batch_size > 1 and self._runs_image_by_image(hidden_states):
            outputs = [self(image, size) for image in hidden_states.split(1)]
            return torch.cat([output for output, _ in outputs]), torch.cat([prior for _, prior in outputs])
        height, width = size
        hidden_states = self.layernorm(hidden_states)
        if self.window_size is not None:
            window = self.window_size
            hidden_states = hidden_states.view(batch_size, height, width, channels)
            padded_size = (round_up(height, window), round_up(width, window))
            if needs_padding(size, padded_size):
                pad = (0, 0, 0, padded_size[1] - width, 0, padded_size[0] - height)
                hidden_states = F.pad(hidden_states, pad)
            hidden_states = window_partition(hidden_states, window).view(-1, window * window, channels)
        for block in self.blocks:
            hidden_states, prior, _ = block(hidden_states)
        if self.window_size is not None:
            hidden_states = self._merge_windows(hidden_states, padded_size, size)
            prior = self._merge_windows(prior, padded_size, size)
        else:  # (the prior can be a view into the class scores of `paired_linear`)
            prior = prior.contiguous()
        return hidden_states, tokens_to_map(prior, size)

    def _runs_image_by_image(self, hidden_states: torch.Tensor) -> bool:
        """Whether a batch goes through one image at a time: in CPU inference without autograd (not while
        compiling or exporting), in SDPA mode (eager mode records each block's attention weights for the whole batch).

        The results are the same, and the temporaries (class scores, values, attention weights: large in early
        stages) are one image's size, which the CPU allocator reuses instead of mapping fresh memory for each of
        them. (GPUs have a caching allocator, and run a whole batch faster.)
        """
        return not (
            hidden_states.device.type != "cpu"
            or torch.is_grad_enabled()
            or self.config._attn_implementation == "eager"
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        )

    def _merge_windows(
        self, windows: torch.Tensor, padded_size: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        channels = windows.shape[-1]
        windows = windows.view(-1, self.window_size, self.window_size, channels)
        merged = window_reverse(windows, self.window_size, *padded_size)
        if needs_padding(size, padded_size):
            merged = merged[:, : size[0], : size[1]].clone(memory_format=torch.contiguous_format)
        return merged.view(merged.shape[0], size[0] * size[1], channels)


class SemaskSwinAttention(SwinAttention):
    """transformers' `SwinAttention`; in SDPA mode on CPUs, without autograd, the windows attend through two
    batched matmuls, adding the relative-position bias and the shift mask in place.

    PyTorch's CPU SDPA kernel is slower than that on Swin's 49-token windows. Elsewhere (other devices, training,
    torch.compile and export) this is transformers' attention.
    """

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            self.config._attn_implementation != "sdpa"
            or hidden_states.device.type != "cpu"
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
        ):
            return super().forward(hidden_states, attention_mask, **kwargs)
        windows, tokens, channels = hidden_states.shape
        heads_shape = (windows, tokens, self.num_attention_heads, self.head_dim)
        query, key, value = (
            projection(hidden_states).view(heads_shape).transpose(1, 2)
            for projection in (self.q_proj, self.k_proj, self.v_proj)
        )
        scores = torch.matmul(query, key.transpose(2, 3)).mul_(self.scaling).add_(self.relative_position_bias())
        if attention_mask is not None:  # (windows per image, tokens, tokens), the same for every image
            scores.view(-1, *attention_mask.shape[:1], *scores.shape[1:]).add_(attention_mask.unsqueeze(1))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value).transpose(1, 2).reshape(windows, tokens, channels)
        return self.o_proj(output), None


class SemaskSwinLayer(SwinLayer):
    """transformers' `SwinLayer` (same weights and computation) with no branch on the map size, for torch.export.

    Windows always partition the map: a window larger than the map is padded, never shrunk (as in the original).
    Its linear layers run on oneDNN's fused kernels in CPU inference (see `fused_kernels`).
    """

    def __init__(
        self, config: SemaskConfig, dim: int, num_heads: int, drop_path_rate: float = 0.0, shift_size: int = 0
    ):
        super().__init__(config, dim, None, num_heads, drop_path_rate=drop_path_rate, shift_size=shift_size)
        self.attention = SemaskSwinAttention(config, dim, num_heads, window_size=config.window_size)
        use_fused_linears(self)
        self.exact_gelu = config.hidden_act == "gelu"

    def maybe_pad(self, hidden_states: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, tuple[int, ...]]:
        window = self.window_size
        padded_size = (round_up(height, window), round_up(width, window))
        pad_values = (0, 0, 0, padded_size[1] - width, 0, padded_size[0] - height)
        if needs_padding((height, width), padded_size):
            hidden_states = F.pad(hidden_states, pad_values)
        return hidden_states, pad_values

    def forward(
        self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states).view(batch_size, height, width, channels)
        hidden_states, _ = self.maybe_pad(hidden_states, height, width)
        _, height_pad, width_pad, _ = hidden_states.shape
        windows = window_partition(self.cyclic_shift(hidden_states), self.window_size)
        windows = windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=hidden_states.dtype, device=windows.device)
        attention_output, attn_weights = self.attention(windows, attn_mask, **kwargs)
        attention_windows = self.dropout(attention_output).view(-1, self.window_size, self.window_size, channels)
        attention_windows = window_reverse(attention_windows, self.window_size, height_pad, width_pad)
        attention_windows = self.cyclic_shift(attention_windows, reverse=True)
        if needs_padding((height, width), (height_pad, width_pad)):
            # a copy rather than .contiguous(), which would ask whether the (symbolic) crop happens to be contiguous
            attention_windows = attention_windows[:, :height, :width].clone(memory_format=torch.contiguous_format)
        attention_windows = attention_windows.view(batch_size, height * width, channels)
        if self.training:
            hidden_states = shortcut + self.drop_path(attention_windows)
        else:  # the merged windows are this call's own copy: add the shortcut into it
            hidden_states = attention_windows.add_(shortcut)
        return self._add_mlp(hidden_states), attn_weights

    def _add_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states + dropout(mlp(layernorm_after(hidden_states)))`, fused where inference allows it."""
        normed = self.layernorm_after(hidden_states)
        if self.training or not self.exact_gelu:
            return hidden_states + self.dropout(self.mlp(normed))
        return linear(linear_gelu(normed, self.mlp.fc1), self.mlp.fc2, residual=hidden_states)


class SemaskPatchMerging(SwinPatchMerging):
    """transformers' `SwinPatchMerging` with no branch on the map size while exporting, and a `FusedLinear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_fused_linears(self)

    def maybe_pad(self, input_feature: torch.Tensor, height: int, width: int) -> torch.Tensor:
        padded_size = (round_up(height, 2), round_up(width, 2))
        if needs_padding((height, width), padded_size):
            pad = (0, 0, 0, padded_size[1] - width, 0, padded_size[0] - height)
            input_feature = F.pad(input_feature, pad)
        return input_feature


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

    def __init__(self, config: SemaskConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # Saved folders name every semask class, so one folder serves all Auto classes with trust_remote_code.
        self.config.auto_map = {**REMOTE_CODE_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}

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

        `swin_model_name_or_path` is a folder or Hub id saved from `SwinModel`, `SwinBackbone` or
        `SwinForImageClassification` (e.g. ``microsoft/swin-tiny-patch4-window7-224``). The Swin architecture
        comes from its config; `config_kwargs` set the rest (labels, semantic layers, head). Semantic layers,
        output norms and the decode head are freshly initialised. Unless given, `semantic_attention` follows the
        original SeMask-FPN rule and `semantic_window_size` equals the Swin window. The weights that were not
        loaded and the checkpoint weights that were not used are logged, and returned with `output_loading_info`.
        """
        swin = AutoModel.from_pretrained(swin_model_name_or_path)
        if swin.config.model_type != "swin":
            raise ValueError(f"Expected a Swin checkpoint, got model_type {swin.config.model_type!r}.")
        swin_arch = {key: getattr(swin.config, key) for key in SWIN_ARCHITECTURE_KEYS}
        conflicts = {
            key: value
            for key, value in config_kwargs.items()
            if key in swin_arch and not settings_equal(value, swin_arch[key])
        }
        if conflicts:
            raise ValueError(f"These settings contradict the Swin checkpoint's architecture {swin_arch}: {conflicts}.")
        config = SemaskConfig(**{**swin_arch, "semantic_window_size": swin_arch["window_size"], **config_kwargs})
        if "semantic_attention" not in config_kwargs:
            config.semantic_attention = fpn_semantic_attention(config.embed_dim, config.num_labels, config.num_layers)
        model = cls(config)
        swin_state = swin.state_dict()
        unused = model.base_model.load_state_dict(swin_state, strict=False).unexpected_keys
        prefix = f"{model.base_model_prefix}." if model.base_model is not model else ""
        loaded = {prefix + key for key in swin_state}
        info = {"missing_keys": [key for key in model.state_dict() if key not in loaded], "unexpected_keys": unused}
        logger.warning(
            "Initialised %s from the Swin weights of %s. Newly initialised: %s. Unused checkpoint weights: %s.",
            cls.__name__,
            swin_model_name_or_path,
            summarize_keys(info["missing_keys"]),
            summarize_keys(info["unexpected_keys"]) or "none",
        )
        model.eval()
        return (model, info) if output_loading_info else model


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
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SemaskModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded right/bottom to a multiple of the patch size.
        """
        wants_attentions = kwargs.get("output_attentions") or kwargs.get("output_semantic_attentions")
        if wants_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"Attention weights are only returned with eager attention, not {self.config._attn_implementation!r}: "
                "call `model.set_attn_implementation('eager')` first."
            )
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

    def __init__(self, config: SemaskConfig):
        super().__init__()
        self.align_corners = config.align_corners
        self.scale_heads = nn.ModuleList(
            [
                self._scale_head(config.embed_dim * 2**index, config.decoder_hidden_size, index)
                for index in range(config.num_layers)
            ]
        )
        self.dropout = nn.Dropout2d(config.classifier_dropout_prob)
        self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, kernel_size=1)
        self.upsample = self._upsample()

    def _upsample(self) -> nn.Upsample:
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=self.align_corners)

    def _scale_head(self, in_channels: int, channels: int, index: int) -> nn.Sequential:
        layers = []
        for step in range(max(1, index)):
            layers.append(FusedConvModule(in_channels if step == 0 else channels, channels, 3, padding=1))
            if index > 0:
                layers.append(self._upsample())
        return nn.Sequential(*layers)

    def _sum_at_first_size(self, maps: list[torch.Tensor], into_first: bool = False) -> torch.Tensor:
        """The sum of `maps`, each resized to the first one's size; `into_first` adds in place into `maps[0]`."""
        output = maps[0]
        for feature_map in maps[1:]:
            # resizing to the same size is an exact copy: always done while exporting, where sizes are symbolic
            if torch.compiler.is_exporting() or feature_map.shape[-2:] != output.shape[-2:]:
                feature_map = F.interpolate(
                    feature_map, size=output.shape[-2:], mode="bilinear", align_corners=self.align_corners
                )
            output = output.add_(feature_map) if into_first else output + feature_map
        return output

    def _run_scale_head(self, head: nn.Sequential, feature_map: torch.Tensor) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training):
            return head(feature_map)
        if torch.compiler.is_compiling():  # compiled graphs recompute without mutating the statistics again
            return checkpoint(head, feature_map, use_reentrant=False)
        context_fn = lambda: (nullcontext(), running_statistics_restored(head))  # noqa: E731
        return checkpoint(head, feature_map, use_reentrant=False, context_fn=context_fn)

    def forward(
        self, feature_maps: tuple[torch.Tensor, ...], semantic_priors: tuple[torch.Tensor, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.classifier(self.dropout(self._fpn_sum(feature_maps)))
        semantic_logits = None if semantic_priors is None else self._semantic_branch(semantic_priors)
        return logits, semantic_logits

    def _fpn_sum(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The scale heads' outputs summed at the first one's size.

        The heads after the first end with the same x2 upsample: when their maps before it share a size (always
        but for some odd input sizes), these maps are summed and upsampled once.
        """
        # without autograd the maps are this call's temporaries: summing in place saves allocating full-size maps
        in_place = not torch.is_grad_enabled()
        first = self._run_scale_head(self.scale_heads[0], feature_maps[0])
        heads = self.scale_heads[1:]
        before_upsample = [self._run_scale_head(head[:-1], x) for head, x in zip(heads, feature_maps[1:])]
        if not before_upsample:
            return first
        # (no test on symbolic sizes while exporting: it would restrict the exported graph to one case)
        if torch.compiler.is_exporting() or len({tuple(x.shape[-2:]) for x in before_upsample}) > 1:
            upsampled = [head[-1](x) for head, x in zip(heads, before_upsample)]
            return self._sum_at_first_size([first, *upsampled], into_first=in_place)
        upsampled = self.upsample(self._sum_at_first_size(before_upsample, into_first=in_place))
        return self._sum_at_first_size([first, upsampled], into_first=in_place)

    def _semantic_branch(self, priors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The sum of the priors, prior i upsampled x2 i times (and resized to the first size if they differ).

        When each prior is exactly half the size of the one before, the sum is accumulated coarse to fine,
        `p0 + up(p1 + up(p2 + up(p3)))`: bilinear upsampling is linear, so this is the same sum (up to float
        rounding) with half the upsampling.
        """
        sizes = [prior.shape[-2:] for prior in priors]
        # (no test on symbolic sizes while exporting: it would restrict the exported graph to one case)
        if not torch.compiler.is_exporting() and all(
            2 * small[0] == big[0] and 2 * small[1] == big[1] for big, small in zip(sizes, sizes[1:])
        ):
            total = priors[-1]
            for prior in reversed(priors[:-1]):
                total = self.upsample(total).add_(prior)  # (upsampling's backward does not need its output)
            return total
        upsampled = []
        for index, prior in enumerate(priors):
            for _ in range(index):
                prior = self.upsample(prior)
            upsampled.append(prior)
        return self._sum_at_first_size(upsampled)


@contextmanager
def running_statistics_restored(module: nn.Module) -> Iterator[None]:
    """Batch-norm running statistics in `module` are put back as they were when the block exits.

    Used while checkpointed layers are recomputed, so that each training step updates the statistics once.
    """
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


class SemaskForSemanticSegmentation(SemaskPreTrainedModel):
    """SeMask-Swin with the semantic-FPN head (the original SeMask-FPN)."""

    # Trainer must not pass `num_items_in_batch`: the loss normalises itself (see `config.loss_reduction`).
    accepts_loss_kwargs = False

    def __init__(self, config: SemaskConfig):
        super().__init__(config)
        self.semask = SemaskModel(config)
        self.decode_head = SemaskFPNHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> SemaskSemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth label maps with values in `[0, num_labels)` or `config.semantic_loss_ignore_index`.
        """
        if labels is not None:
            self.check_labels(labels, pixel_values)
        outputs = self.semask(pixel_values, **kwargs)
        logits, semantic_logits = self.decode_head(outputs.feature_maps, outputs.semantic_priors)
        loss = None
        if labels is not None:
            decode_loss, semantic_loss = self.losses(logits, semantic_logits, labels)
            loss = decode_loss if semantic_loss is None else decode_loss + semantic_loss
        return SemaskSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            semantic_logits=semantic_logits,
            semantic_priors=outputs.semantic_priors,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            semantic_attentions=outputs.semantic_attentions,
        )

    def check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor) -> None:
        """Raise a ValueError unless labels are (batch_size, H, W) integers at the images' size, in the label set or
        the ignore index."""
        check_label_maps(labels, pixel_values, self.config.num_labels, self.config.semantic_loss_ignore_index)

    def losses(
        self, logits: torch.Tensor, semantic_logits: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original's two loss terms: decode cross-entropy and `semantic_loss_weight` x semantic cross-entropy.

        Both stride-4 maps are resized (bilinear) to the label size first. With gradient checkpointing the
        full-resolution logits are not kept for the backward pass but recomputed there.
        """
        decode_loss = self._checkpointed_cross_entropy(logits, labels)
        if semantic_logits is None:
            return decode_loss, None
        return decode_loss, self.config.semantic_loss_weight * self._checkpointed_cross_entropy(semantic_logits, labels)

    def _checkpointed_cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.decode_head.gradient_checkpointing and self.training:
            return checkpoint(self._cross_entropy, logits, labels, use_reentrant=False)
        return self._cross_entropy(logits, labels)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=self.config.align_corners)
        ignore_index = self.config.semantic_loss_ignore_index
        if self.config.loss_reduction == "valid_pixels":
            return F.cross_entropy(logits, labels, ignore_index=ignore_index)
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none").mean()


class SemaskBackbone(BackboneMixin, SemaskPreTrainedModel):
    """SeMask-Swin feature maps for other heads (e.g. `UperNetConfig(backbone_config=SemaskConfig(...))`)."""

    def __init__(self, config: SemaskConfig):
        super().__init__(config)
        self.num_features = [config.embed_dim] + [config.embed_dim * 2**index for index in range(config.num_layers)]
        self.semask = SemaskModel(config)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BackboneOutput:
        outputs = self.semask(pixel_values, **kwargs)
        maps = dict(zip(self.stage_names[1:], outputs.feature_maps))
        maps["stem"] = tokens_to_map(outputs.hidden_states[0], outputs.feature_maps[0].shape[-2:])
        return BackboneOutput(
            feature_maps=tuple(maps[name] for name in self.out_features),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "SemaskBackbone",
    "SemaskForSemanticSegmentation",
    "SemaskModel",
    "SemaskPreTrainedModel",
]
