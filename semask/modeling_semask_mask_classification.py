"""What SeMask adds to transformers' mask classification models (MaskFormer, Mask2Former), shared by both variants.

The original padding of images to `size_divisibility`, the parameter-free semantic head on the encoder's semantic
priors, its loss (`loss_cate`), the mask classification targets built from semantic label maps and the checks of
the targets.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .modeling_semask import check_label_maps, pad_bottom_right, sum_of_upsampled_priors
from .sizes import padded_to

SCIPY_HINT = (
    "Computing the loss of SeMask-MaskFormer and SeMask-Mask2Former needs scipy (the Hungarian matching of "
    "transformers' losses): install it with `pip install scipy`. Inference works without it."
)


@dataclass
class SemanticPriorsOutput(ModelOutput):
    r"""
    semantic_priors (`tuple(torch.FloatTensor)`):
        The encoder's per-stage semantic prior maps, `(batch_size, num_labels, height_i, width_i)` (pre-softmax).
    """

    semantic_priors: tuple[torch.FloatTensor, ...] | None = None


def pad_to_multiple(tensor: torch.Tensor, divisor: int, value: float = 0) -> torch.Tensor:
    """Pad the last two dimensions with `value` on the bottom / right to multiples of `divisor`."""
    return pad_bottom_right(tensor, padded_to(tensor.shape[-2:], divisor), value=value)


def semantic_head(semantic_priors: tuple[torch.Tensor, ...], stride: int) -> torch.Tensor:
    """The original parameter-free `SemanticHead`: class scores at the input resolution from the priors.

    The semantic branch of the FPN head (`sum_of_upsampled_priors`), with `align_corners=True`, upsampled by
    `stride` (stage 1's).
    """
    logits = sum_of_upsampled_priors(semantic_priors, align_corners=True)
    size = (logits.shape[-2] * stride, logits.shape[-1] * stride)
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def mask_classification_targets(
    labels: torch.Tensor, ignore_index: int = 255
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mask classification targets from semantic label maps (B, H, W), as the original dataset mapper builds them.

    Returns `mask_labels` (per image, one float binary mask (H, W) per class present) and `class_labels` (per image,
    those classes in ascending order); `ignore_index` pixels belong to no mask.
    """
    mask_labels, class_labels = [], []
    for label_map in labels:
        classes = label_map.unique()
        classes = classes[classes != ignore_index]
        mask_labels.append((label_map[None] == classes[:, None, None]).float())
        class_labels.append(classes)
    return mask_labels, class_labels


def refuse_unknown_arguments(model: nn.Module, kwargs: dict) -> None:
    """Raise a TypeError naming keyword arguments that the forward would otherwise ignore."""
    if kwargs:
        raise TypeError(
            f"{type(model).__name__}.forward got arguments it does not use: {sorted(kwargs)}. It takes pixel_values, "
            "the targets, output_hidden_states, output_attentions and (for the segmentation model) "
            "output_auxiliary_logits."
        )


# The model outputs that the segmentation outputs pass on as they are.
PASSED_ON_OUTPUTS = (
    "encoder_last_hidden_state",
    "pixel_decoder_last_hidden_state",
    "transformer_decoder_last_hidden_state",
    "encoder_hidden_states",
    "pixel_decoder_hidden_states",
    "transformer_decoder_hidden_states",
    "attentions",
    "semantic_priors",
)


class InitialiseEveryModuleMixin:
    """Runs `_init_weights` on every module, as transformers does for the models it ships.

    transformers counts every model class outside its package as custom code and skips `_init_weights` for such
    models' modules without weights of their own, but the `_init_weights` of Mask2Former and MaskFormer set such
    modules' children (the deformable attention's sampling offsets, the Xavier initialisation of the decoder layers
    and projections). Every `_init_weights` here initialises through `transformers.initialization`, which leaves
    loaded weights alone by itself.
    """

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        super()._initialize_weights(module, is_custom_code=False)


class SemanticHeadMixin:
    """The semantic head, targets, checks and losses of a SeMask mask classification model: transformers' mask
    classification losses (`get_loss_dict`, `criterion`, `get_loss`) plus the semantic head's cross-entropy. Needs
    `config.size_divisibility`, `config.ignore_value`, `config.num_labels`, `config.semantic_loss_weight`,
    `config.use_auxiliary_loss` and `config.output_auxiliary_logits`."""

    def segmentation_outputs(
        self,
        outputs: ModelOutput,
        class_queries_logits: tuple[torch.Tensor, ...],
        masks_queries_logits: tuple[torch.Tensor, ...],
        *,
        mask_labels: list[torch.Tensor] | None,
        class_labels: list[torch.Tensor] | None,
        labels: torch.Tensor | None,
        output_auxiliary_logits: bool | None,
    ) -> dict:
        """The fields of the segmentation output from the model's `outputs` and every decoder layer's class and mask
        predictions: the final ones, the earlier ones (`auxiliary_logits`, on request), the semantic head's scores,
        the loss where targets are given, and the model's states."""
        auxiliary_logits = [
            {"class_queries_logits": classes, "masks_queries_logits": masks}
            for classes, masks in zip(class_queries_logits[:-1], masks_queries_logits[:-1])
        ]
        semantic_logits = None
        if outputs.semantic_priors is not None:
            semantic_logits = semantic_head(outputs.semantic_priors, stride=self.config.backbone_config.patch_size)
        loss = None
        if labels is not None or mask_labels is not None:
            loss_dict = self.loss_terms(
                masks_queries_logits[-1],
                class_queries_logits[-1],
                auxiliary_logits if self.config.use_auxiliary_loss else [],
                semantic_logits,
                mask_labels=mask_labels,
                class_labels=class_labels,
                labels=labels,
            )
            loss = self.get_loss(loss_dict)
        if output_auxiliary_logits is None:
            output_auxiliary_logits = self.config.output_auxiliary_logits
        return {
            "loss": loss,
            "class_queries_logits": class_queries_logits[-1],
            "masks_queries_logits": masks_queries_logits[-1],
            "auxiliary_logits": auxiliary_logits if output_auxiliary_logits else None,
            "semantic_logits": semantic_logits,
            **{name: getattr(outputs, name) for name in PASSED_ON_OUTPUTS},
        }

    def loss_terms(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        auxiliary_logits: list[dict[str, torch.Tensor]],
        semantic_logits: torch.Tensor | None,
        *,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted loss terms: transformers' for the final and each earlier prediction (`loss_cross_entropy`,
        `loss_mask`, `loss_dice`, suffixed `_0`, `_1`, ... as transformers names them) and `loss_semantic` (the
        original's `loss_cate`). Targets at the input size are padded as the images are (masks with 0, labels with
        `ignore_value`); without `mask_labels`, they are built from `labels`."""
        if self.criterion is None:
            raise ImportError(SCIPY_HINT)
        divisor, ignore_index = self.config.size_divisibility, self.config.ignore_value
        if labels is not None:
            labels = pad_to_multiple(labels, divisor, value=ignore_index)
        if mask_labels is None:
            mask_labels, class_labels = mask_classification_targets(labels, ignore_index)
        else:
            mask_labels = [pad_to_multiple(masks.float(), divisor) for masks in mask_labels]
        loss_dict = self.get_loss_dict(
            masks_queries_logits, class_queries_logits, mask_labels, class_labels, auxiliary_logits
        )
        if labels is not None and semantic_logits is not None:
            loss_dict["loss_semantic"] = self.config.semantic_loss_weight * self.semantic_loss(semantic_logits, labels)
        return loss_dict

    def semantic_loss(self, semantic_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the semantic head averaged over the non-ignored pixels (0 when every pixel is ignored)."""
        ignore_index = self.config.ignore_value
        loss = F.cross_entropy(semantic_logits.float(), labels, ignore_index=ignore_index, reduction="sum")
        return loss / (labels != ignore_index).sum().clamp(min=1)

    def _check_targets(
        self,
        pixel_values: torch.Tensor,
        mask_labels: list[torch.Tensor] | None,
        class_labels: list[torch.Tensor] | None,
        labels: torch.Tensor | None,
    ) -> None:
        batch_size, _, height, width = pixel_values.shape
        if labels is not None:
            check_label_maps(labels, pixel_values, self.config.num_labels, self.config.ignore_value)
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("Pass `mask_labels` and `class_labels` together (or neither, with `labels`).")
        if mask_labels is not None:
            if len(mask_labels) != batch_size or len(class_labels) != batch_size:
                raise ValueError(
                    f"Expected one `mask_labels` and one `class_labels` entry per image ({batch_size}), got "
                    f"{len(mask_labels)} and {len(class_labels)}."
                )
            for masks, classes in zip(mask_labels, class_labels):
                if masks.ndim != 3 or masks.shape[1:] != (height, width) or masks.shape[0] != len(classes):
                    raise ValueError(
                        f"Each `mask_labels` entry must be (num_targets, {height}, {width}) with one class per mask; "
                        f"got masks {tuple(masks.shape)} for {len(classes)} classes."
                    )
