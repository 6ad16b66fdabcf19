"""PyTorch SeMask-Mask2Former: the SeMask-Swin encoder feeding transformers' Mask2Former.

The pixel decoder (multi-scale deformable attention), the masked-attention transformer decoder, the class predictor
and the Hungarian-matching losses are transformers' own Mask2Former modules. This file adds the SeMask encoder, the
original's image padding, the parameter-free semantic head on the encoder's semantic priors and its loss.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerForUniversalSegmentationOutput,
    Mask2FormerLoss,
    Mask2FormerModelOutput,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelLevelModuleOutput,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_scipy_available
from transformers.utils.generic import can_return_tuple

from .configuration_semask_mask2former import SemaskMask2FormerConfig
from .modeling_semask import SemaskModel, with_remote_code_auto_map
from .modeling_semask_fapn import SemaskFaPNPixelDecoder, SemaskMSFaPNPixelDecoder, init_fapn_weights
from .modeling_semask_mask_classification import (
    InitialiseEveryModuleMixin,
    SemanticHeadMixin,
    SemanticPriorsOutput,
    pad_to_multiple,
    refuse_unknown_arguments,
)

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_semask_mask2former.SemaskMask2FormerConfig",
    "AutoModel": "modeling_semask_mask2former.SemaskMask2FormerModel",
    "AutoModelForUniversalSegmentation": "modeling_semask_mask2former.SemaskMask2FormerForUniversalSegmentation",
    # pipeline("image-segmentation") loads remote code through this Auto class
    "AutoModelForSemanticSegmentation": "modeling_semask_mask2former.SemaskMask2FormerForUniversalSegmentation",
}


@dataclass
class SemaskMask2FormerPixelLevelModuleOutput(SemanticPriorsOutput, Mask2FormerPixelLevelModuleOutput):
    r"""As [`Mask2FormerPixelLevelModuleOutput`], plus the encoder's `semantic_priors` ([`SemanticPriorsOutput`])."""


@dataclass
class SemaskMask2FormerModelOutput(SemanticPriorsOutput, Mask2FormerModelOutput):
    r"""As [`Mask2FormerModelOutput`] (`transformer_decoder_intermediate_states` is always returned), plus the
    encoder's `semantic_priors` ([`SemanticPriorsOutput`])."""


@dataclass
class SemaskMask2FormerForUniversalSegmentationOutput(SemanticPriorsOutput, Mask2FormerForUniversalSegmentationOutput):
    r"""
    As [`Mask2FormerForUniversalSegmentationOutput`] (predictions refer to the padded input, see
    `config.size_divisibility`), plus the encoder's `semantic_priors` ([`SemanticPriorsOutput`]) and:

    semantic_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, padded_height, padded_width)`):
        The semantic head's class scores at the padded input size.
    """

    semantic_logits: torch.FloatTensor | None = None


class SemaskMask2FormerPixelLevelModule(nn.Module):
    """The SeMask-Swin encoder and the pixel decoder of `config.pixel_decoder` (transformers' Mask2Former one, FaPN
    or MSFaPN); also returns the semantic priors."""

    def __init__(self, config: SemaskMask2FormerConfig):
        super().__init__()
        backbone = config.backbone_config
        self.encoder = SemaskModel(backbone)
        channels = [backbone.embed_dim * 2**index for index in range(backbone.num_layers)]
        if config.pixel_decoder == "fapn":
            self.decoder = SemaskFaPNPixelDecoder(channels, config.feature_size, config.mask_feature_size)
        elif config.pixel_decoder == "msfapn":
            self.decoder = SemaskMSFaPNPixelDecoder(config, feature_channels=channels)
        else:
            self.decoder = Mask2FormerPixelDecoder(config, feature_channels=channels)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> SemaskMask2FormerPixelLevelModuleOutput:
        encoder_outputs = self.encoder(pixel_values, return_dict=True)
        feature_maps = encoder_outputs.feature_maps
        decoder_outputs = self.decoder(feature_maps, output_hidden_states=output_hidden_states)
        return SemaskMask2FormerPixelLevelModuleOutput(
            encoder_last_hidden_state=feature_maps[-1],
            encoder_hidden_states=feature_maps if output_hidden_states else None,
            decoder_last_hidden_state=decoder_outputs.mask_features,
            decoder_hidden_states=decoder_outputs.multi_scale_features,
            semantic_priors=encoder_outputs.semantic_priors,
        )


class SemaskMask2FormerPreTrainedModel(InitialiseEveryModuleMixin, Mask2FormerPreTrainedModel):
    config: SemaskMask2FormerConfig
    # The Mask2Former modules do not use the attention implementation; the SeMask encoder runs "eager" or "sdpa".
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"criterion\.empty_weight"]

    def post_init(self) -> None:
        super().post_init()
        with_remote_code_auto_map(self.config, REMOTE_CODE_AUTO_MAP)

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs) -> None:
        if (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "SeMask-Mask2Former does not support `use_reentrant=True` activation checkpointing: transformers' "
                "Mask2Former decoder layers take tensors as keyword arguments, which reentrant checkpointing "
                "backpropagates twice. Use the default, `use_reentrant=False`."
            )
        super()._activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        init_fapn_weights(module)


class SemaskMask2FormerModel(SemaskMask2FormerPreTrainedModel):
    """SeMask-Swin encoder, Mask2Former pixel decoder and transformer decoder: mask predictions and decoder states."""

    def __init__(self, config: SemaskMask2FormerConfig):
        super().__init__(config)
        self.pixel_level_module = SemaskMask2FormerPixelLevelModule(config)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemaskMask2FormerModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded to a multiple of `config.size_divisibility`.
        output_hidden_states (`bool`, *optional*):
            Return the encoder's feature maps and the decoders' hidden states.
        output_attentions (`bool`, *optional*):
            Return the transformer decoder's attention weights in `attentions` (one per decoder layer).
        """
        refuse_unknown_arguments(self, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pixel_values = pad_to_multiple(pixel_values, self.config.size_divisibility)
        pixel_level = self.pixel_level_module(pixel_values, output_hidden_states=output_hidden_states)
        transformer = self.transformer_module(
            multi_scale_features=pixel_level.decoder_hidden_states,
            mask_features=pixel_level.decoder_last_hidden_state,
            output_hidden_states=True,
            output_attentions=output_attentions or self.config.output_attentions,
        )
        return SemaskMask2FormerModelOutput(
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=transformer.last_hidden_state,
            encoder_hidden_states=pixel_level.encoder_hidden_states,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states if output_hidden_states else None,
            transformer_decoder_hidden_states=transformer.hidden_states if output_hidden_states else None,
            transformer_decoder_intermediate_states=transformer.intermediate_hidden_states,
            masks_queries_logits=transformer.masks_queries_logits,
            attentions=transformer.attentions,
            semantic_priors=pixel_level.semantic_priors,
        )


class SemaskMask2FormerForUniversalSegmentation(
    SemanticHeadMixin, SemaskMask2FormerPreTrainedModel, Mask2FormerForUniversalSegmentation
):
    """SeMask-Mask2Former: Mask2Former's class and mask predictions, the semantic head and all training losses.

    Semantic segmentation: `SemaskImageProcessor.post_process_semantic_segmentation` or `semask.inference`.
    """

    # Trainer must not pass `num_items_in_batch`: the losses normalise themselves.
    accepts_loss_kwargs = False

    def __init__(self, config: SemaskMask2FormerConfig):
        Mask2FormerPreTrainedModel.__init__(self, config)  # Mask2FormerForUniversalSegmentation's would build a Swin
        self.model = SemaskMask2FormerModel(config)
        self.weight_dict = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        # Only training needs the loss, and its Hungarian matcher needs scipy.
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict) if is_scipy_available() else None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_auxiliary_logits: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemaskMask2FormerForUniversalSegmentationOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded to a multiple of `config.size_divisibility`.
        mask_labels (`list[torch.Tensor]`, *optional*):
            Per image, binary masks `(num_targets, height, width)` (Mask2Former's targets). Built from `labels` when
            not given (`mask_classification_targets`).
        class_labels (`list[torch.LongTensor]`, *optional*):
            Per image, the class of each mask in `mask_labels`, `(num_targets,)`.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Semantic label maps with values in `[0, num_labels)` or `config.ignore_value`: the targets of the
            semantic head's loss and, unless `mask_labels` are given, of the Mask2Former losses.
        output_hidden_states (`bool`, *optional*):
            Return the encoder's feature maps and the decoders' hidden states.
        output_auxiliary_logits (`bool`, *optional*):
            Return the class and mask predictions of every decoder layer in `auxiliary_logits`.
        output_attentions (`bool`, *optional*):
            Return the transformer decoder's attention weights in `attentions` (one per decoder layer).
        """
        refuse_unknown_arguments(self, kwargs)
        self._check_targets(pixel_values, mask_labels, class_labels, labels)
        outputs = self.model(  # a ModelOutput whatever `config.return_dict` (the config is shared)
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        class_queries_logits = tuple(
            self.class_predictor(states.transpose(0, 1)) for states in outputs.transformer_decoder_intermediate_states
        )
        fields = self.segmentation_outputs(
            outputs,
            class_queries_logits,
            outputs.masks_queries_logits,
            mask_labels=mask_labels,
            class_labels=class_labels,
            labels=labels,
            output_auxiliary_logits=output_auxiliary_logits,
        )
        return SemaskMask2FormerForUniversalSegmentationOutput(**fields)


__all__ = [
    "SemaskMask2FormerForUniversalSegmentation",
    "SemaskMask2FormerModel",
    "SemaskMask2FormerPreTrainedModel",
]
