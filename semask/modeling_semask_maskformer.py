"""PyTorch SeMask-MaskFormer: the SeMask-Swin encoder feeding transformers' MaskFormer.

The pixel decoder (an FPN), the DETR transformer decoder on the last stage's features, the class and mask predictors
and the Hungarian-matching losses are transformers' own MaskFormer modules. This file adds the SeMask encoder, the
original's image padding, the per-layer predictions of the original DETR decoder, the parameter-free semantic head on
the encoder's semantic priors and its loss.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.maskformer.modeling_maskformer import (
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerHungarianMatcher,
    MaskFormerLoss,
    MaskformerMLPPredictionHead,
    MaskFormerModelOutput,
    MaskFormerPixelDecoder,
    MaskFormerPixelLevelModuleOutput,
    MaskFormerPreTrainedModel,
    MaskFormerTransformerModule,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_scipy_available
from transformers.utils.generic import can_return_tuple

from .configuration_semask_maskformer import SemaskMaskFormerConfig
from .modeling_semask import SemaskModel, with_remote_code_auto_map
from .modeling_semask_mask_classification import (
    InitialiseEveryModuleMixin,
    SemanticHeadMixin,
    SemanticPriorsOutput,
    pad_to_multiple,
    refuse_unknown_arguments,
)

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_semask_maskformer.SemaskMaskFormerConfig",
    "AutoModel": "modeling_semask_maskformer.SemaskMaskFormerModel",
    "AutoModelForInstanceSegmentation": "modeling_semask_maskformer.SemaskMaskFormerForInstanceSegmentation",
    # pipeline("image-segmentation") loads remote code through this Auto class
    "AutoModelForSemanticSegmentation": "modeling_semask_maskformer.SemaskMaskFormerForInstanceSegmentation",
}


@dataclass
class SemaskMaskFormerPixelLevelModuleOutput(SemanticPriorsOutput, MaskFormerPixelLevelModuleOutput):
    r"""As [`MaskFormerPixelLevelModuleOutput`], plus the encoder's `semantic_priors` ([`SemanticPriorsOutput`])."""


@dataclass
class SemaskMaskFormerModelOutput(SemanticPriorsOutput, MaskFormerModelOutput):
    r"""
    As [`MaskFormerModelOutput`], plus the encoder's `semantic_priors` ([`SemanticPriorsOutput`]) and:

    transformer_decoder_intermediate_states (`tuple(torch.FloatTensor)`):
        Every decoder layer's output `(batch_size, num_queries, hidden_size)` after the decoder's final LayerNorm
        (the original DETR decoder's `return_intermediate`); the last one is `transformer_decoder_last_hidden_state`.
    """

    transformer_decoder_intermediate_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SemaskMaskFormerForInstanceSegmentationOutput(SemanticPriorsOutput, MaskFormerForInstanceSegmentationOutput):
    r"""
    As [`MaskFormerForInstanceSegmentationOutput`] (predictions refer to the padded input, see
    `config.size_divisibility`), plus the encoder's `semantic_priors` ([`SemanticPriorsOutput`]) and:

    semantic_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, padded_height, padded_width)`):
        The semantic head's class scores at the padded input size.
    """

    semantic_logits: torch.FloatTensor | None = None


def normalised_layer_outputs(decoder_outputs, layernorm: nn.LayerNorm) -> tuple[torch.Tensor, ...]:
    """Every DETR decoder layer's output after the decoder's final `layernorm`, as the original predicts from them.

    transformers records the decoder's input, each layer's un-normalised output and, last, the normalised final
    output (`last_hidden_state`) in `hidden_states`; each layer feeds the next its un-normalised output, as in the
    original.
    """
    *inner, _ = decoder_outputs.hidden_states[1:]
    return (*(layernorm(states) for states in inner), decoder_outputs.last_hidden_state)


class SemaskMaskFormerPixelLevelModule(nn.Module):
    """The SeMask-Swin encoder and transformers' MaskFormer FPN pixel decoder; also returns the semantic priors."""

    def __init__(self, config: SemaskMaskFormerConfig):
        super().__init__()
        backbone = config.backbone_config
        self.encoder = SemaskModel(backbone)
        channels = [backbone.embed_dim * 2**index for index in range(backbone.num_layers)]
        self.decoder = MaskFormerPixelDecoder(
            in_features=channels[-1],
            lateral_widths=channels[:-1],
            feature_size=config.fpn_feature_size,
            mask_feature_size=config.mask_feature_size,
        )

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> SemaskMaskFormerPixelLevelModuleOutput:
        encoder_outputs = self.encoder(pixel_values, return_dict=True)
        feature_maps = encoder_outputs.feature_maps
        decoder_outputs = self.decoder(feature_maps, output_hidden_states=output_hidden_states)
        return SemaskMaskFormerPixelLevelModuleOutput(
            encoder_last_hidden_state=feature_maps[-1],
            decoder_last_hidden_state=decoder_outputs.last_hidden_state,
            encoder_hidden_states=feature_maps if output_hidden_states else None,
            decoder_hidden_states=decoder_outputs.hidden_states if output_hidden_states else None,
            semantic_priors=encoder_outputs.semantic_priors,
        )


class SemaskMaskFormerPreTrainedModel(InitialiseEveryModuleMixin, MaskFormerPreTrainedModel):
    config: SemaskMaskFormerConfig
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected = [r"relative_position_index", r"criterion\.empty_weight"]

    def post_init(self) -> None:
        super().post_init()
        with_remote_code_auto_map(self.config, REMOTE_CODE_AUTO_MAP)


class SemaskMaskFormerModel(SemaskMaskFormerPreTrainedModel):
    """SeMask-Swin encoder, MaskFormer pixel decoder and DETR decoder: mask features and every layer's queries."""

    def __init__(self, config: SemaskMaskFormerConfig):
        super().__init__(config)
        self.pixel_level_module = SemaskMaskFormerPixelLevelModule(config)
        last_stage = config.backbone_config.embed_dim * 2 ** (config.backbone_config.num_layers - 1)
        self.transformer_module = MaskFormerTransformerModule(in_features=last_stage, config=config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemaskMaskFormerModelOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded to a multiple of `config.size_divisibility`.
        output_hidden_states (`bool`, *optional*):
            Return the encoder's feature maps, the FPN's maps and the transformer decoder's layer outputs.
        output_attentions (`bool`, *optional*):
            Return the transformer decoder's self-attention weights (with the "eager" attention implementation).
        """
        refuse_unknown_arguments(self, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        pixel_values = pad_to_multiple(pixel_values, self.config.size_divisibility)
        pixel_level = self.pixel_level_module(pixel_values, output_hidden_states=output_hidden_states)
        transformer = self.transformer_module(
            pixel_level.encoder_last_hidden_state,
            output_hidden_states=True,
            output_attentions=output_attentions or self.config.output_attentions,
        )
        layer_outputs = normalised_layer_outputs(transformer, self.transformer_module.decoder.layernorm)
        return SemaskMaskFormerModelOutput(
            encoder_last_hidden_state=pixel_level.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_level.decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=transformer.last_hidden_state,
            encoder_hidden_states=pixel_level.encoder_hidden_states,
            pixel_decoder_hidden_states=pixel_level.decoder_hidden_states,
            transformer_decoder_hidden_states=transformer.hidden_states if output_hidden_states else None,
            attentions=transformer.attentions or None,
            transformer_decoder_intermediate_states=layer_outputs,
            semantic_priors=pixel_level.semantic_priors,
        )


class SemaskMaskFormerForInstanceSegmentation(
    SemanticHeadMixin, SemaskMaskFormerPreTrainedModel, MaskFormerForInstanceSegmentation
):
    """SeMask-MaskFormer: MaskFormer's class and mask predictions, the semantic head and all training losses.

    Semantic segmentation: `SemaskImageProcessor.post_process_semantic_segmentation` or `semask.inference`.
    """

    # Trainer must not pass `num_items_in_batch`: the losses normalise themselves.
    accepts_loss_kwargs = False

    def __init__(self, config: SemaskMaskFormerConfig):
        MaskFormerPreTrainedModel.__init__(self, config)  # MaskFormerForInstanceSegmentation's would build a Swin
        self.model = SemaskMaskFormerModel(config)
        hidden_size = config.decoder_config.hidden_size
        self.class_predictor = nn.Linear(hidden_size, config.num_labels + 1)
        self.mask_embedder = MaskformerMLPPredictionHead(hidden_size, hidden_size, config.mask_feature_size)
        self.weight_dict = {
            "loss_cross_entropy": config.cross_entropy_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        # Only training needs the loss, and its Hungarian matcher needs scipy.
        self.criterion = None
        if is_scipy_available():
            matcher = MaskFormerHungarianMatcher(
                cost_class=1.0, cost_mask=config.mask_weight, cost_dice=config.dice_weight
            )
            self.criterion = MaskFormerLoss(
                config.num_labels, matcher=matcher, weight_dict=self.weight_dict, eos_coef=config.no_object_weight
            )
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
    ) -> SemaskMaskFormerForInstanceSegmentationOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size; they are padded to a multiple of `config.size_divisibility`.
        mask_labels (`list[torch.Tensor]`, *optional*):
            Per image, binary masks `(num_targets, height, width)` (MaskFormer's targets). Built from `labels` when
            not given (`mask_classification_targets`).
        class_labels (`list[torch.LongTensor]`, *optional*):
            Per image, the class of each mask in `mask_labels`, `(num_targets,)`.
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Semantic label maps with values in `[0, num_labels)` or `config.ignore_value`: the targets of the
            semantic head's loss and, unless `mask_labels` are given, of the MaskFormer losses.
        output_hidden_states (`bool`, *optional*):
            Return the encoder's feature maps and the decoders' hidden states.
        output_auxiliary_logits (`bool`, *optional*):
            Return the class and mask predictions of every earlier decoder layer in `auxiliary_logits`.
        output_attentions (`bool`, *optional*):
            Return the transformer decoder's self-attention weights (with the "eager" attention implementation).
        """
        refuse_unknown_arguments(self, kwargs)
        self._check_targets(pixel_values, mask_labels, class_labels, labels)
        outputs = self.model(  # a ModelOutput whatever `config.return_dict` (the config is shared)
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        # Every layer's queries predict classes and masks (the original TransformerPredictor with deep supervision).
        queries = torch.stack(outputs.transformer_decoder_intermediate_states)
        mask_embeddings = self.mask_embedder(queries)
        masks = torch.einsum("lbqc,bchw->lbqhw", mask_embeddings, outputs.pixel_decoder_last_hidden_state)
        fields = self.segmentation_outputs(
            outputs,
            tuple(self.class_predictor(queries)),
            tuple(masks),
            mask_labels=mask_labels,
            class_labels=class_labels,
            labels=labels,
            output_auxiliary_logits=output_auxiliary_logits,
        )
        return SemaskMaskFormerForInstanceSegmentationOutput(**fields)


__all__ = [
    "SemaskMaskFormerForInstanceSegmentation",
    "SemaskMaskFormerModel",
    "SemaskMaskFormerPreTrainedModel",
]
