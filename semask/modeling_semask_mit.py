"""PyTorch SeMask-MiT: SegFormer's Mix Transformer whose stages end with SeMask's semantic attention blocks.

The overlapping patch embeddings, Mix Transformer blocks, stage norms and the all-MLP decode head are transformers'
own SegFormer modules (so SegFormer / MiT weights load by name); the semantic attention blocks, the semantic-FPN
head, the semantic branch and the losses are SeMask-Swin's (`modeling_semask`).
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel, SegformerConfig
from transformers import initialization as init
from transformers.models.segformer.modeling_segformer import (
    SegformerAttention,
    SegformerDecodeHead,
    SegformerForImageClassification,
    SegformerForSemanticSegmentation,
    SegformerModel,
    SegformerStage,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_semask import settings_equal
from .configuration_semask_mit import MIT_PER_STAGE_SETTINGS, SemaskMitConfig
from .modeling_semask import (
    SemanticSegmentationMixin,
    SemaskFPNHead,
    SemaskModelOutput,
    SemaskSemanticAttention,
    SemaskSemanticBlocks,
    check_pixel_values,
    sum_of_upsampled_priors,
    summarize_keys,
    tokens_to_map,
    warn_unless_eager,
    with_remote_code_auto_map,
)

logger = logging.get_logger(__name__)

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_semask_mit.SemaskMitConfig",
    "AutoModel": "modeling_semask_mit.SemaskMitModel",
    "AutoModelForSemanticSegmentation": "modeling_semask_mit.SemaskMitForSemanticSegmentation",
}

# SegFormer hyper-parameters that fix the shapes of the encoder weights.
MIT_ARCHITECTURE_KEYS = ("num_channels", "num_encoder_blocks", *MIT_PER_STAGE_SETTINGS, "hidden_act")
# Other SegFormer settings a SeMask-MiT built on a SegFormer checkpoint inherits unless told otherwise.
SEGFORMER_DEFAULT_KEYS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout_prob",
    "initializer_range",
    "drop_path_rate",
    "decoder_hidden_size",
    "semantic_loss_ignore_index",
)
SEGFORMER_CLASSES = {
    model_class.__name__: model_class
    for model_class in (SegformerModel, SegformerForSemanticSegmentation, SegformerForImageClassification)
}


@dataclass
class SemaskMitModelOutput(SemaskModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_sizes[-1], height / 32, width / 32)`):
        The last feature map.
    feature_maps (`tuple(torch.FloatTensor)`):
        One map per stage, `(batch_size, hidden_sizes[i], height_i, width_i)` (strides 4, 8, 16, 32): the stage's
        output after its norm and semantic attention blocks, which also feeds the next stage.
    semantic_priors (`tuple(torch.FloatTensor)`):
        One map per stage, `(batch_size, num_labels, height_i, width_i)`: the class-query projection of the stage's
        last semantic block (pre-softmax). `None` without semantic blocks.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        As in [`SegformerModel`]: each stage's output map (the feature maps).
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` in eager mode):
        Attention weights of every Mix Transformer block, `(batch_size, num_heads, tokens, reduced_tokens)`.
    semantic_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_semantic_attentions=True`
    in eager mode):
        Attention weights of every semantic block, `(batch_size * num_windows, 1, tokens, tokens)`.
    """


class SemaskMitStage(SegformerStage):
    """SegFormer's stage (overlapping patch embedding, Mix Transformer blocks, LayerNorm), then semantic attention
    blocks on the normed tokens: with every gamma 0 it computes SegFormer's stage exactly."""

    def __init__(self, config: SemaskMitConfig, stage_idx: int, drop_path_decays: list[float]):
        super().__init__(config, stage_idx, drop_path_decays)
        num_blocks = config.num_semantic_blocks[stage_idx]
        window_size = config.semantic_window_size if config.semantic_attention[stage_idx] == "windowed" else None
        width = config.hidden_sizes[stage_idx]
        self.semantic_layer = SemaskSemanticBlocks(config, width, num_blocks, window_size) if num_blocks else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, channels, H, W) maps → the stage's output map and its semantic prior map (or None)."""
        hidden_states, height, width = self.patch_embeddings(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states, height, width)
        hidden_states = self.layer_norm(hidden_states)
        prior = None
        if self.semantic_layer is not None:
            hidden_states, prior = self.semantic_layer(hidden_states, (height, width))
        return tokens_to_map(hidden_states, (height, width)).contiguous(), prior


class SemaskMitMLPHead(SegformerDecodeHead):
    """transformers' SegFormer all-MLP decode head (same weights and computation), plus SeMask's parameter-free
    semantic branch (`sum_of_upsampled_priors`); the losses are recomputed in the backward pass when it is
    checkpointed."""

    gradient_checkpointing = False

    def forward(
        self, feature_maps: tuple[torch.Tensor, ...], semantic_priors: tuple[torch.Tensor, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = super().forward(feature_maps)
        if semantic_priors is None:
            return logits, None
        return logits, sum_of_upsampled_priors(semantic_priors, self.config.align_corners)


def load_segformer(segformer_model_name_or_path: str) -> PreTrainedModel:
    """A transformers SegFormer checkpoint (`SegformerModel`, `SegformerForSemanticSegmentation` or
    `SegformerForImageClassification`, e.g. an ImageNet MiT), with its head; a ValueError for other model types."""
    config = AutoConfig.from_pretrained(segformer_model_name_or_path)
    if config.model_type != "segformer":
        raise ValueError(f"Expected a SegFormer checkpoint, got model_type {config.model_type!r}.")
    architecture = next((name for name in config.architectures or () if name in SEGFORMER_CLASSES), "SegformerModel")
    return SEGFORMER_CLASSES[architecture].from_pretrained(segformer_model_name_or_path)


def segformer_encoder_settings(segformer_config: SegformerConfig, **config_kwargs) -> dict:
    """`SemaskMitConfig` keyword arguments for a SeMask-MiT on a SegFormer checkpoint: its architecture and settings
    (and a segmentation checkpoint's labels, unless `config_kwargs` set labels), then `config_kwargs`; a ValueError
    where these contradict the architecture."""
    architecture = {key: getattr(segformer_config, key) for key in MIT_ARCHITECTURE_KEYS}
    conflicts = {
        key: value
        for key, value in config_kwargs.items()
        if key in architecture and not settings_equal(value, architecture[key])
    }
    if conflicts:
        raise ValueError(
            f"These settings contradict the SegFormer checkpoint's architecture {architecture}: {conflicts}."
        )
    settings = {key: getattr(segformer_config, key) for key in SEGFORMER_DEFAULT_KEYS}
    is_segmenter = "SegformerForSemanticSegmentation" in (segformer_config.architectures or ())
    if is_segmenter and "id2label" not in config_kwargs and "num_labels" not in config_kwargs:
        settings["id2label"] = segformer_config.id2label
    return {**architecture, **settings, **config_kwargs}


class SemaskMitPreTrainedModel(PreTrainedModel):
    config: SemaskMitConfig
    base_model_prefix = "segformer"  # SegFormer checkpoints' keys
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SemaskMitStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SemaskMitStage, index=0, capture_initial_hidden_state=False),
        "attentions": OutputRecorder(SegformerAttention, index=1, capture_initial_hidden_state=False),
        "semantic_attentions": OutputRecorder(SemaskSemanticAttention, index=2, capture_initial_hidden_state=False),
    }

    def post_init(self) -> None:
        super().post_init()
        with_remote_code_auto_map(self.config, REMOTE_CODE_AUTO_MAP)
        from .cpu_inference import use_cpu_inference_kernels

        use_cpu_inference_kernels(self)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SemaskSemanticAttention):
            init.zeros_(module.gamma)  # a fresh semantic block passes its input on unchanged (as in SeMask-Swin)

    @classmethod
    def from_segformer_pretrained(
        cls, segformer_model_name_or_path: str, output_loading_info: bool = False, **config_kwargs
    ) -> "SemaskMitPreTrainedModel | tuple[SemaskMitPreTrainedModel, dict[str, list[str]]]":
        """A SeMask-MiT whose encoder (and decode head, where it fits) comes from a transformers SegFormer checkpoint.

        Args:
            segformer_model_name_or_path (`str`):
                A folder (or Hub id) saved from `SegformerModel`, `SegformerForSemanticSegmentation` or
                `SegformerForImageClassification` (e.g. an ImageNet ``nvidia/mit-b0``). The MiT architecture and
                SegFormer's settings come from its config, and a segmentation checkpoint's labels too.
            output_loading_info (`bool`, *optional*, defaults to `False`):
                Also return `{"missing_keys": [...], "unexpected_keys": [...]}`: the weights that were not loaded
                and the checkpoint weights that were not used (both are logged).
            config_kwargs:
                The other `SemaskMitConfig` settings (labels, semantic blocks, head). The semantic blocks are freshly
                initialised; so is the head unless it is the MLP head of a segmentation checkpoint with the same
                label count and width.
        """
        segformer = load_segformer(segformer_model_name_or_path)
        model = cls(SemaskMitConfig(**segformer_encoder_settings(segformer.config, **config_kwargs)))
        info = model.load_segformer_weights(segformer, segformer_model_name_or_path)
        model.eval()
        return (model, info) if output_loading_info else model

    def load_segformer_weights(self, segformer: PreTrainedModel, source: str) -> dict[str, list[str]]:
        """Load a transformers SegFormer model's encoder weights into this model (matching names) and its decode head
        where every head weight matches in name and shape; log and return the weights left as they were
        (`missing_keys`) and the SegFormer weights not used (`unexpected_keys`)."""
        prefix = f"{self.base_model_prefix}."
        own_prefix = prefix if self.base_model is self else ""
        # both as named in SemaskMitForSemanticSegmentation: "segformer.stages...", "decode_head..."
        theirs = {
            (prefix + key if segformer.base_model is segformer else key): value
            for key, value in segformer.state_dict().items()
        }
        ours = {own_prefix + key: value for key, value in self.state_dict().items()}
        head = {key for key in theirs if key.startswith("decode_head.")}
        head_fits = head == {key for key in ours if key.startswith("decode_head.")} and all(
            theirs[key].shape == ours[key].shape for key in head
        )
        loaded = {
            key
            for key, value in theirs.items()
            if key in ours and value.shape == ours[key].shape and (head_fits or key not in head)
        }
        self.load_state_dict({key.removeprefix(own_prefix): theirs[key] for key in loaded}, strict=False)
        info = {
            "missing_keys": [key.removeprefix(own_prefix) for key in ours if key not in loaded],
            "unexpected_keys": [key for key in theirs if key not in loaded],
        }
        logger.warning(
            "Initialised %s from the SegFormer weights of %s. Newly initialised: %s. Unused checkpoint weights: %s.",
            type(self).__name__,
            source,
            summarize_keys(info["missing_keys"]) or "none",
            summarize_keys(info["unexpected_keys"]) or "none",
        )
        return info


class SemaskMitModel(SemaskMitPreTrainedModel):
    """The SeMask-MiT encoder: per-stage feature maps and semantic prior maps."""

    def __init__(self, config: SemaskMitConfig):
        super().__init__(config)
        total_depth = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total_depth - 1, 1) for index in range(total_depth)]
        self.stages = nn.ModuleList(
            [SemaskMitStage(config, index, rates) for index in range(config.num_encoder_blocks)]
        )
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> SemaskMitModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size.
        output_hidden_states (`bool`, *optional*):
            Return each stage's output map in `hidden_states`.
        output_attentions (`bool`, *optional*):
            Return the Mix Transformer attention weights in `attentions` (eager attention only).
        output_semantic_attentions (`bool`, *optional*):
            Return the semantic attention weights in `semantic_attentions` (eager attention only).
        """
        check_pixel_values(pixel_values, self.config.num_channels)
        warn_unless_eager(self.config, kwargs)
        hidden_states, feature_maps, priors = pixel_values, (), ()
        for stage in self.stages:
            hidden_states, prior = stage(hidden_states)
            feature_maps += (hidden_states,)
            if prior is not None:
                priors += (prior,)
        return SemaskMitModelOutput(
            last_hidden_state=hidden_states, feature_maps=feature_maps, semantic_priors=priors or None
        )


class SemaskMitForSemanticSegmentation(SemanticSegmentationMixin, SemaskMitPreTrainedModel):
    """SeMask-MiT with SegFormer's all-MLP head or SeMask's semantic-FPN head (`config.decode_head`), each with the
    semantic branch, and SeMask-FPN's loss."""

    def __init__(self, config: SemaskMitConfig):
        super().__init__(config)
        self.segformer = SemaskMitModel(config)
        self.decode_head = (
            SemaskMitMLPHead(config)
            if config.decode_head == "mlp"
            else SemaskFPNHead(config, in_channels=config.hidden_sizes)
        )
        self.post_init()


__all__ = [
    "SemaskMitForSemanticSegmentation",
    "SemaskMitModel",
    "SemaskMitPreTrainedModel",
]
