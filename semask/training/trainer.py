"""The original SeMask training recipes on torchvision, torch and `transformers.Trainer`.

SeMask-FPN (mmsegmentation 0.x) and SeMask-Mask2Former (detectron2) share the pipeline below; the Mask2Former
model builds its mask-classification targets from the label maps itself (`mask_classification_targets`, as the
original dataset mapper does), and its recipe's settings are switches here too (see "SeMask-Mask2Former" below).

Each piece is switchable (see `RecipeArguments`); the defaults follow the original configs
(`SeMask-FPN/configs/semask_swin/*`, with mmseg's pipelines and mmcv's schedulers):

- Augmentation, in mmseg's order: random keep-ratio rescale to `ratio x` the processor's scale (`RandomRescale`),
  random crop whose largest class covers less than `cat_max_ratio` of it (`CatMaxRatioRandomCrop`), horizontal
  flip (p 0.5), photometric distortion (`PhotometricDistortion`), normalisation, then padding to the crop size with
  0 (after normalisation) for images and 255 (ignored) for labels (`PadToSize`). Label maps are `tv_tensors.Mask`,
  which torchvision always resizes with nearest-neighbour interpolation.
- AdamW without weight decay on LayerNorms, relative position bias tables and the absolute position embedding
  (`SemaskTrainer.get_decay_parameter_names`), as the original's `paramwise_cfg` does. Biases and the decode head's
  BatchNorms keep their decay: the original's "norm" key does not match mmcv's "bn" names.
- Poly learning rate (power 1, minimum 0) over all steps times mmcv's linear warm-up from `warmup_ratio` (1e-6)
  over `warmup_steps` (1500) (`poly_warmup_factor`).
- Optional OHEM on the main cross-entropy (`ohem_cross_entropy`), as the original Swin-L ADE20K and COCO-Stuff
  configs use (`OHEMPixelSampler(min_kept=100000)`, no threshold); the semantic-branch loss stays plain.

The original ADE20K / COCO-Stuff configs train with lr 1e-4, weight decay 1e-4, 16 images per step and 80k steps;
the Cityscapes ones with lr 1e-3 and weight decay 0.05.

SeMask-Mask2Former (the original `train_net.py` and Mask2Former's base configs): AdamW without weight decay on every
normalisation layer, embedding table, relative position bias table and position embedding (the same function picks
these for mask-classification models), the encoder's learning rate times `backbone_lr_multiplier` (0.1),
`poly_power` 0.9 without warm-up, full-model gradient clipping (`max_grad_norm` 0.01), no category re-drawing of
crops (`cat_max_ratio` 1) and crops padded with the pixel value 128 before normalisation (`pad_pixel_value`); the
training script makes these the defaults for this model. OHEM is refused: it applies to per-pixel logits.
Evaluation scores the classes with the original semantic inference (`semantic_scores_for_metrics`).
"""

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from .configuration_semask import SemaskConfig
from .configuration_semask_mask2former import SemaskMask2FormerConfig
from .data import decode_image
from .image_processing_semask import IGNORE_INDEX, SemaskImageProcessor, image_to_array, rescaled_size, upright_rgb
from .inference import is_mask_classification, semantic_inference
from .modelcard import encoder_config
from .modeling_semask import SemaskForSemanticSegmentation, SemaskModel, summarize_keys
from .modeling_semask_mask2former import (
    SemaskMask2FormerForUniversalSegmentation,
    SemaskMask2FormerForUniversalSegmentationOutput,
)
from .presets import fpn_semantic_attention, mask2former_semantic_attention

logger = logging.getLogger(__name__)

TINY_CONFIG = {
    "embed_dim": 32,
    "depths": (2, 2, 2, 2),
    "num_heads": (1, 2, 4, 8),
    "window_size": 4,
    "semantic_window_size": 4,
    "mlp_ratio": 2.0,
    "decoder_hidden_size": 32,
    "drop_path_rate": 0.1,
}
"""A SeMask small enough to train on a CPU in minutes (`--preset tiny`)."""

TINY_MASK2FORMER_CONFIG = {
    "backbone_config": {key: value for key, value in TINY_CONFIG.items() if key != "decoder_hidden_size"},
    "feature_size": 32,
    "mask_feature_size": 32,
    "hidden_dim": 32,
    "num_attention_heads": 4,
    "encoder_layers": 1,
    "encoder_feedforward_dim": 64,
    "decoder_layers": 3,
    "dim_feedforward": 64,
    "num_queries": 16,
    "train_num_points": 256,
}
"""A SeMask-Mask2Former with the encoder of `TINY_CONFIG` (`--preset tiny --model_type semask_mask2former`)."""

MODEL_CLASSES = {
    SemaskConfig.model_type: SemaskForSemanticSegmentation,
    SemaskMask2FormerConfig.model_type: SemaskMask2FormerForUniversalSegmentation,
}
MODEL_NAMES = {SemaskConfig.model_type: "SeMask", SemaskMask2FormerConfig.model_type: "SeMask-Mask2Former"}
NO_DECAY_PARAMETER_NAMES = ("relative_position_bias_table", "position_embeddings")
# The modules whose parameters the original Mask2Former optimiser leaves without weight decay.
MASK2FORMER_NO_DECAY_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
)
# Model outputs that evaluation neither needs nor gathers across processes.
EVAL_IGNORED_OUTPUTS = ["semantic_logits", "semantic_priors", "hidden_states", "attentions", "semantic_attentions"]
MASK2FORMER_EVAL_OUTPUTS = ("class_queries_logits", "masks_queries_logits")
MASK2FORMER_EVAL_IGNORED_OUTPUTS = [
    output.name
    for output in fields(SemaskMask2FormerForUniversalSegmentationOutput)
    if output.name not in MASK2FORMER_EVAL_OUTPUTS
]


@dataclass
class ModelArguments:
    """Where the model's weights come from (command-line arguments of the training script)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A SeMask or SeMask-Mask2Former model folder or Hub id (a different label set re-initialises the "
            "class projections of the semantic layers and the classifier), or a transformers Swin checkpoint "
            "(encoder only)."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "Random weights in a released architecture "
            f"({', '.join(SemaskConfig.preset_names + SemaskMask2FormerConfig.preset_names)}) or 'tiny' (a small "
            "demo model); the label set comes from the data."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"The model to train: {', '.join(f'{key} ({name})' for key, name in MODEL_NAMES.items())}. "
            "Default: the checkpoint's or preset's kind; SeMask (FPN) for Swin checkpoints and 'tiny'."
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={"help": "Stochastic depth rate (default: the checkpoint's or preset's; 0.3 originally)."},
    )

    def __post_init__(self):
        if self.model_type is not None and self.model_type not in MODEL_CLASSES:
            raise ValueError(f"--model_type must be one of {', '.join(MODEL_CLASSES)}; got {self.model_type!r}.")


@dataclass
class RecipeArguments:
    """Switches and settings of the original training recipe (see the module docstring)."""

    crop_size: list[int] = field(
        default_factory=lambda: [512, 512], metadata={"help": "Training crop: SIZE or HEIGHT WIDTH (512 originally)."}
    )
    image_scale: list[int] | None = field(
        default=None,
        metadata={
            "help": "LONGEST SHORTEST edge that images are fitted into, keeping their aspect ratio, for evaluation "
            "and (times a random ratio) for training. Default: the dataset preset's, else 2048 512."
        },
    )
    random_rescale: bool = field(default=True, metadata={"help": "Randomly rescale training images."})
    rescale_ratio_range: list[float] = field(
        default_factory=lambda: [0.5, 2.0], metadata={"help": "MIN MAX of the uniformly drawn rescale ratio."}
    )
    rescale_ratios: list[float] | None = field(
        default=None,
        metadata={
            "help": "Draw the ratio from these values instead (the original ADE20K / COCO-Stuff configs use "
            "0.5 0.75 1.0 1.25 1.5 1.75)."
        },
    )
    cat_max_ratio: float = field(
        default=0.75,
        metadata={"help": "Re-draw a crop (up to 10 times) while one class covers this share of it; 1 disables it."},
    )
    flip_probability: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    photometric_distortion: bool = field(default=True, metadata={"help": "Random brightness/contrast/saturation/hue."})
    pad_pixel_value: float | None = field(
        default=None,
        metadata={
            "help": "Pad training crops with this 0-255 pixel value before normalisation (128 in the original "
            "Mask2Former); default: 0 after normalisation, i.e. the mean colour (mmseg)."
        },
    )
    original_weight_decay_groups: bool = field(
        default=True,
        metadata={
            "help": "No weight decay on LayerNorms, relative position tables and position embeddings only (the "
            "original). False: transformers' default (no decay on biases and norms)."
        },
    )
    poly_schedule: bool = field(
        default=True,
        metadata={"help": "Poly schedule with mmcv's linear warm-up; False: use --lr_scheduler_type instead."},
    )
    poly_power: float = field(default=1.0, metadata={"help": "Power of the poly schedule."})
    backbone_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "Learning-rate factor of the SeMask-Swin encoder (0.1 in the original Mask2Former recipe)."},
    )
    warmup_ratio: float = field(
        default=1e-6, metadata={"help": "Learning-rate factor at the start of the linear warm-up (--warmup_steps)."}
    )
    ohem: bool = field(default=False, metadata={"help": "Online hard example mining on the main loss."})
    ohem_threshold: float | None = field(
        default=None,
        metadata={"help": "Keep pixels whose true-class probability is below this (None: the highest losses)."},
    )
    ohem_min_kept: int = field(default=100000, metadata={"help": "Pixels kept per image at least."})
    sync_batch_norm: bool = field(
        default=True,
        metadata={"help": "Multi-GPU runs: BatchNorm statistics over all processes' batches (the original's SyncBN)."},
    )

    def __post_init__(self):
        if len(self.crop_size) == 1:
            self.crop_size = self.crop_size * 2
        if len(self.crop_size) != 2 or min(self.crop_size) < 1:
            raise ValueError(f"--crop_size takes SIZE or HEIGHT WIDTH (positive), got {self.crop_size}.")
        if self.image_scale is not None and (len(self.image_scale) != 2 or min(self.image_scale) < 1):
            raise ValueError(f"--image_scale takes LONGEST SHORTEST (positive), got {self.image_scale}.")
        low, high = self.rescale_ratio_range
        if not 0 < low <= high:
            raise ValueError(f"--rescale_ratio_range needs 0 < MIN <= MAX, got {self.rescale_ratio_range}.")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"--cat_max_ratio must lie in (0, 1], got {self.cat_max_ratio}.")
        if self.pad_pixel_value is not None and not 0 <= self.pad_pixel_value <= 255:
            raise ValueError(f"--pad_pixel_value is a pixel value in [0, 255], got {self.pad_pixel_value}.")
        if self.backbone_lr_multiplier < 0:
            raise ValueError(f"--backbone_lr_multiplier must not be negative, got {self.backbone_lr_multiplier}.")


# ---------------------------------------------------------------------------------------------------------------
# Model initialisation


@dataclass
class InitialisationReport:
    """What `initialise_model` loaded and what it initialised afresh."""

    source: str
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"Initialised from {self.source}."]
        if self.reinitialised:
            lines.append(f"Newly initialised ({len(self.reinitialised)}): {summarize_keys(self.reinitialised)}")
        if self.unused:
            lines.append(f"Checkpoint weights not used ({len(self.unused)}): {summarize_keys(self.unused)}")
        return "\n".join(lines)


def resolve_model_type(args: ModelArguments) -> str:
    """The kind of model to train, "semask" (SeMask-FPN) or "semask_mask2former": `--model_type`, which must agree
    with the preset's or checkpoint's kind; for "tiny", Swin checkpoints and no model it defaults to SeMask-FPN."""
    implied, source = None, None
    if args.preset:
        if args.preset in SemaskMask2FormerConfig.preset_names:
            implied = SemaskMask2FormerConfig.model_type
        elif args.preset in SemaskConfig.preset_names:
            implied = SemaskConfig.model_type
        elif args.preset != "tiny":
            names = ", ".join(("tiny", *SemaskConfig.preset_names, *SemaskMask2FormerConfig.preset_names))
            raise ValueError(f"Unknown preset {args.preset!r}; expected one of: {names}.")
        source = f"the preset {args.preset!r}"
    elif args.model_name_or_path:
        checkpoint_type = AutoConfig.from_pretrained(args.model_name_or_path).model_type
        if checkpoint_type not in (*MODEL_CLASSES, "swin"):
            raise ValueError(
                f"{args.model_name_or_path} is a {checkpoint_type!r} checkpoint; expected a SeMask, SeMask-Mask2Former "
                "or Swin one."
            )
        implied = checkpoint_type if checkpoint_type in MODEL_CLASSES else None
        source = f"the checkpoint {args.model_name_or_path}"
    if args.model_type and implied and args.model_type != implied:
        raise ValueError(f"--model_type {args.model_type} contradicts {source}, which is a {implied!r} model.")
    return args.model_type or implied or SemaskConfig.model_type


def initialise_model(
    args: ModelArguments, id2label: dict[int, str]
) -> tuple[SemaskForSemanticSegmentation | SemaskMask2FormerForUniversalSegmentation, InitialisationReport]:
    """A SeMask-FPN or SeMask-Mask2Former model (`resolve_model_type`) for the label set `id2label`, from a checkpoint
    of that kind, a Swin checkpoint, a preset or "tiny"."""
    if args.model_name_or_path and args.preset:
        raise ValueError("Pass either --model_name_or_path or --preset, not both.")
    if not args.preset and not args.model_name_or_path:
        raise ValueError("No model given: pass --model_name_or_path (SeMask or Swin checkpoint) or --preset.")
    model_type = resolve_model_type(args)
    labels = {"id2label": dict(id2label), "label2id": {name: index for index, name in id2label.items()}}
    if args.preset:
        config = preset_config(args.preset, model_type, labels)
        set_drop_path_rate(config, args.drop_path_rate)
        return MODEL_CLASSES[model_type](config), InitialisationReport(
            f"random weights in the {args.preset!r} architecture"
        )
    if AutoConfig.from_pretrained(args.model_name_or_path).model_type == "swin":
        return _model_from_swin(args.model_name_or_path, model_type, labels, args.drop_path_rate)
    return _model_from_checkpoint(args.model_name_or_path, model_type, labels, args.drop_path_rate)


def preset_config(preset: str, model_type: str, labels: dict) -> PreTrainedConfig:
    """The config of `preset` (or of the tiny demo model) for `labels`.

    The original code picks the semantic attention kind from the class count, so the new label set decides it.
    """
    if model_type == SemaskMask2FormerConfig.model_type:
        if preset == "tiny":
            config = SemaskMask2FormerConfig(**TINY_MASK2FORMER_CONFIG, **labels)
        else:
            config = SemaskMask2FormerConfig.from_preset(preset, **labels)
        encoder = config.backbone_config
        encoder.semantic_attention = mask2former_semantic_attention(config.num_labels, encoder.num_layers)
        return config
    config = SemaskConfig(**TINY_CONFIG, **labels) if preset == "tiny" else SemaskConfig.from_preset(preset, **labels)
    config.semantic_attention = fpn_semantic_attention(config.embed_dim, config.num_labels, config.num_layers)
    return config


def set_drop_path_rate(config: PreTrainedConfig, drop_path_rate: float | None) -> None:
    """Set the encoder's stochastic depth rate, unless `drop_path_rate` is None."""
    if drop_path_rate is not None:
        encoder_config(config).drop_path_rate = drop_path_rate


def _model_from_swin(
    path: str, model_type: str, labels: dict, drop_path_rate: float | None
) -> tuple[PreTrainedModel, InitialisationReport]:
    overrides = {"drop_path_rate": drop_path_rate} if drop_path_rate is not None else {}
    source = f"the Swin checkpoint {path}"
    if model_type == SemaskConfig.model_type:
        model, info = SemaskForSemanticSegmentation.from_swin_pretrained(
            path, output_loading_info=True, **labels, **overrides
        )
        return model, InitialisationReport(source, info["missing_keys"], info["unexpected_keys"])
    encoder, info = SemaskModel.from_swin_pretrained(path, output_loading_info=True, **labels, **overrides)
    config = SemaskMask2FormerConfig(backbone_config=encoder.config.to_dict(), **labels)
    config.backbone_config.semantic_attention = mask2former_semantic_attention(
        config.num_labels, config.backbone_config.num_layers
    )
    model = SemaskMask2FormerForUniversalSegmentation(config)
    model.model.pixel_level_module.encoder.load_state_dict(encoder.state_dict())
    prefix = "model.pixel_level_module.encoder."
    fresh = [name for name in model.state_dict() if not name.startswith(prefix)]
    fresh += [prefix + name for name in info["missing_keys"]]
    return model, InitialisationReport(source, sorted(fresh), sorted(info["unexpected_keys"]))


def _model_from_checkpoint(
    path: str, model_type: str, labels: dict, drop_path_rate: float | None
) -> tuple[PreTrainedModel, InitialisationReport]:
    config = AutoConfig.from_pretrained(path)
    previous_labels = config.id2label
    config.id2label, config.label2id = labels["id2label"], labels["label2id"]
    set_drop_path_rate(config, drop_path_rate)
    model, info = MODEL_CLASSES[model_type].from_pretrained(
        path, config=config, ignore_mismatched_sizes=True, output_loading_info=True
    )
    mismatched = sorted(key for key, *_ in info["mismatched_keys"])
    report = InitialisationReport(
        f"the {MODEL_NAMES[model_type]} checkpoint {path}",
        sorted(set(info["missing_keys"]) | set(mismatched)),
        sorted(info["unexpected_keys"]),
    )
    if mismatched:
        logger.warning(
            "The label set changed (%d -> %d classes): re-initialised the class projections of the semantic layers "
            "and the classifier: %s",
            len(previous_labels),
            len(labels["id2label"]),
            summarize_keys(mismatched),
        )
    elif previous_labels != labels["id2label"]:
        logger.warning(
            "The label names differ from the checkpoint's but their number (%d) does not: the class weights are kept.",
            len(previous_labels),
        )
    return model, report


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


class RandomRescale(v2.Transform):
    """mmseg's `Resize(img_scale=(longest, shortest), ratio_range=..., keep_ratio=True)`.

    A ratio is drawn uniformly from `ratio_range`, or from `ratios` when given (the original's list form), the scale
    becomes `(int(longest * ratio), int(shortest * ratio))` and the image is resized, keeping its aspect ratio, to
    the largest size fitting that scale (mmcv's rounding). Bilinear without antialiasing for images, as OpenCV does.
    """

    def __init__(
        self,
        longest_edge: int,
        shortest_edge: int,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        ratios: list[float] | None = None,
    ):
        super().__init__()
        self.longest_edge, self.shortest_edge = longest_edge, shortest_edge
        self.ratio_range = ratio_range
        self.ratios = ratios

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if self.ratios:
            ratio = self.ratios[int(torch.randint(len(self.ratios), ()))]
        else:
            low, high = self.ratio_range
            ratio = low + float(torch.rand(())) * (high - low)
        longest, shortest = int(self.longest_edge * ratio), int(self.shortest_edge * ratio)
        return {"size": list(rescaled_size(*v2.query_size(flat_inputs), shortest, longest))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            TF.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )


class CatMaxRatioRandomCrop(v2.Transform):
    """mmseg's `RandomCrop(crop_size, cat_max_ratio)`: a random crop of at most `size` (height, width).

    With `cat_max_ratio < 1`, a crop is re-drawn (up to `max_attempts` times, then the last draw is kept) while its
    label map holds fewer than two classes or one class covers `cat_max_ratio` or more of its non-ignored pixels.
    """

    def __init__(
        self, size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX, max_attempts=10
    ):
        super().__init__()
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_attempts = max_attempts

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]
        box = self._random_box(height, width)
        if self.cat_max_ratio < 1 and masks:
            for _ in range(self.max_attempts):
                if self._is_balanced(masks[0], box):
                    break
                box = self._random_box(height, width)
        return box

    def _random_box(self, height: int, width: int) -> dict[str, int]:
        crop_height, crop_width = self.size
        top = int(torch.randint(max(height - crop_height, 0) + 1, ()))
        left = int(torch.randint(max(width - crop_width, 0) + 1, ()))
        return {"top": top, "left": left, "height": min(crop_height, height), "width": min(crop_width, width)}

    def _is_balanced(self, mask: torch.Tensor, box: dict[str, int]) -> bool:
        crop = mask[..., box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]]
        _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
        return counts.numel() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.crop, inpt, **params)


class PadToSize(v2.Transform):
    """Pad the bottom and right to at least `size` (height, width), with `image_fill` (one value or one per channel)
    and `mask_fill` for masks."""

    def __init__(self, size: tuple[int, int], image_fill: float | list[float] = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = tuple(size)
        self.image_fill, self.mask_fill = image_fill, mask_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size[1] - width, 0), max(self.size[0] - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return self._call_kernel(TF.pad, inpt, padding=params["padding"], fill=fill)


class PhotometricDistortion(v2.RandomPhotometricDistort):
    """torchvision's `RandomPhotometricDistort` set up like mmseg's `PhotoMetricDistortion`.

    Shared: each of brightness, contrast, saturation and hue is applied with probability 0.5, in that order, with
    contrast first or last at random; contrast and saturation factors in [0.5, 1.5]; hue shifts up to 18/180 of the
    hue circle (mmseg's `hue_delta=18` on OpenCV's 0-180 scale). Differences: brightness is a factor in
    [0.875, 1.125] (mmseg adds a value in [-32, 32]); contrast blends with the mean grey level and saturation with
    the grey image (mmseg scales the pixel values, resp. the HSV saturation); results stay in floating point
    between the steps (mmseg rounds to uint8 after each). The channel permutation of torchvision's transform is
    never applied: mmseg has none.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(hue=(-18 / 180, 18 / 180), p=p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "channel_permutation": None}


def normalization_constants(processor: SemaskImageProcessor) -> tuple[list[float], list[float]]:
    """The processor's rescale + normalisation as one mean / std on the 0-255 pixel scale."""
    scale = processor.rescale_factor if processor.do_rescale else 1.0
    if not processor.do_normalize:
        return [0.0] * 3, [1.0 / scale] * 3
    mean, std = np.broadcast_to(processor.image_mean, 3), np.broadcast_to(processor.image_std, 3)
    return (mean / scale).tolist(), (std / scale).tolist()


def build_train_augmentation(processor: SemaskImageProcessor, recipe: RecipeArguments) -> v2.Compose:
    """The training pipeline for a `(tv_tensors.Image uint8, tv_tensors.Mask)` pair (see the module docstring)."""
    steps = []
    if recipe.random_rescale:
        steps.append(
            RandomRescale(
                processor.size["longest_edge"],
                processor.size["shortest_edge"],
                tuple(recipe.rescale_ratio_range),
                recipe.rescale_ratios,
            )
        )
    steps.append(CatMaxRatioRandomCrop(recipe.crop_size, recipe.cat_max_ratio))
    if recipe.flip_probability > 0:
        steps.append(v2.RandomHorizontalFlip(recipe.flip_probability))
    if recipe.photometric_distortion:
        steps.append(PhotometricDistortion())
    mean, std = normalization_constants(processor)
    # Padding with a pixel value before normalising equals padding with its normalised value afterwards.
    image_fill = 0.0
    if recipe.pad_pixel_value is not None:
        image_fill = ((recipe.pad_pixel_value - np.array(mean)) / np.array(std)).tolist()
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}),
        v2.Normalize(mean, std),
        PadToSize(recipe.crop_size, image_fill=image_fill),
    ]
    return v2.Compose(steps)


def label_map(label: Image.Image | np.ndarray, processor: SemaskImageProcessor) -> np.ndarray:
    """A label map as an int64 array, reduced (0 -> 255, k -> k - 1) when the processor reduces labels."""
    array = (image_to_array(label) if isinstance(label, Image.Image) else np.asarray(label)).astype(np.int64)
    return processor.reduce_label(array) if processor.do_reduce_labels else array


def decoded_pairs(batch: dict[str, list], split: str) -> Iterator[tuple[Image.Image, Image.Image | np.ndarray]]:
    """The (image, label map) pairs of a `set_transform` batch, decoded here when the dataset is `data.undecoded`
    (so a file that cannot be decoded is named); images upright RGB (`upright_rgb`: 16-bit scaled, not clipped),
    label maps upright too (`data.decode_image`)."""
    for image, label in zip(batch["image"], batch["label"]):
        image = upright_rgb(decode_image(image, f"a {split} image"))
        yield image, decode_image(label, f"a {split} label map")


class TrainTransform:
    """`datasets.Dataset.set_transform` function: "image"/"label" batches to augmented "pixel_values"/"labels".

    Give it `data.undecoded(dataset)` so that an undecodable file raises a `DatasetValidationError` naming it."""

    def __init__(self, processor: SemaskImageProcessor, recipe: RecipeArguments, split: str = "train"):
        self.augmentation = build_train_augmentation(processor, recipe)
        self.processor = processor
        self.split = split

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        pixel_values, labels = [], []
        for image, label in decoded_pairs(batch, self.split):
            image = tv_tensors.Image(TF.pil_to_tensor(image))
            mask = tv_tensors.Mask(torch.from_numpy(label_map(label, self.processor)))
            image, mask = self.augmentation(image, mask)
            pixel_values.append(image.as_subclass(torch.Tensor))
            labels.append(mask.as_subclass(torch.Tensor))
        return {"pixel_values": pixel_values, "labels": labels}


class EvalTransform:
    """`set_transform` function for evaluation: the image processor's test pipeline, one image at a time (give it
    `data.undecoded(dataset)`, as `TrainTransform`)."""

    def __init__(self, processor: SemaskImageProcessor, split: str = "validation"):
        self.processor = processor
        self.split = split

    def __call__(self, batch: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        pixel_values, labels = [], []
        for image, label in decoded_pairs(batch, self.split):
            features = self.processor(image, segmentation_maps=label, return_tensors="pt")
            pixel_values.append(features["pixel_values"][0])
            labels.append(features["labels"][0])
        return {"pixel_values": pixel_values, "labels": labels}


def pad_collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples, padding bottom/right to the largest one: images with 0, labels with 255 (ignored)."""
    height = max(feature["pixel_values"].shape[-2] for feature in features)
    width = max(feature["pixel_values"].shape[-1] for feature in features)

    def padded(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, width - tensor.shape[-1], 0, height - tensor.shape[-2]), value=value)

    return {
        "pixel_values": torch.stack([padded(feature["pixel_values"], 0) for feature in features]),
        "labels": torch.stack([padded(feature["labels"], IGNORE_INDEX) for feature in features]),
    }


# ---------------------------------------------------------------------------------------------------------------
# Optimisation and loss


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """The parameters the original recipe trains without weight decay.

    SeMask-FPN (the original's `paramwise_cfg`: decay_mult 0 for 'norm', 'relative_position_bias_table' and
    'absolute_pos_embed'): LayerNorm parameters, relative position bias tables and the absolute position embedding.
    Mask classification models (the original Mask2Former optimiser): also every other normalisation layer's and
    every `nn.Embedding`'s parameters.
    """
    module_types = MASK2FORMER_NO_DECAY_MODULES if is_mask_classification(model) else (nn.LayerNorm,)
    names = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, module_types)
        for name, _ in module.named_parameters(recurse=False)
    }
    names |= {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in NO_DECAY_PARAMETER_NAMES}
    return names


def scale_encoder_learning_rate(optimizer: torch.optim.Optimizer, model: nn.Module, multiplier: float) -> None:
    """Move the SeMask-Swin encoder's parameters of each parameter group of `optimizer` into a copy of that group
    whose learning rate is `multiplier` times the group's (the original Mask2Former's backbone multiplier)."""
    encoder_ids = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, SemaskModel)
        for parameter in module.parameters()
    }
    for group in list(optimizer.param_groups):
        encoder_parameters = [parameter for parameter in group["params"] if id(parameter) in encoder_ids]
        if encoder_parameters:
            group["params"] = [parameter for parameter in group["params"] if id(parameter) not in encoder_ids]
            optimizer.add_param_group({**group, "params": encoder_parameters, "lr": group["lr"] * multiplier})


def semantic_scores_for_metrics(outputs: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """`Trainer(preprocess_logits_for_metrics=...)` for mask classification models: the semantic inference scores
    (B, C, H, W) at the labels' size from a batch's (class_queries_logits, masks_queries_logits), which are then
    gathered across processes instead of the predictions."""
    class_queries_logits, masks_queries_logits = outputs
    return semantic_inference(class_queries_logits, masks_queries_logits, labels.shape[-2:])


def poly_warmup_factor(step: int, *, total_steps: int, warmup_steps: int, warmup_ratio: float, power: float) -> float:
    """mmcv's `poly` learning-rate factor (minimum 0) at `step`, times its linear warm-up factor before `warmup_steps`.

    `(1 - step / total_steps) ** power`, multiplied during warm-up by `1 - (1 - step / warmup_steps) * (1 - ratio)`.
    """
    factor = (1 - min(step, total_steps) / total_steps) ** power
    if step < warmup_steps:
        factor *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return factor


def ohem_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    threshold: float | None = None,
    min_kept: int = 100000,
    loss_reduction: str = "all_pixels",
) -> torch.Tensor:
    """Cross-entropy over the hard pixels that mmseg's `OHEMPixelSampler` selects.

    `logits` (B, C, H, W) must already have the labels' size. Without `threshold`, the `min_kept * B` non-ignored
    pixels with the highest loss are kept; with it, the pixels whose true-class probability is below
    `max(threshold, the (min_kept * B)-th lowest probability)`. The sum of the kept pixels' losses is divided by all
    pixels (`loss_reduction="all_pixels"`, mmseg's mean) or by the kept pixels (`"valid_pixels"`).
    """
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    with torch.no_grad():
        valid = labels != ignore_index
        batch_kept = min_kept * labels.shape[0]
        kept = torch.zeros_like(valid)
        if threshold is not None:
            probabilities = logits.softmax(dim=1).gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
            valid_probabilities = probabilities[valid].sort().values
            if valid_probabilities.numel():
                threshold = max(threshold, valid_probabilities[min(batch_kept, valid_probabilities.numel() - 1)].item())
            kept = valid & (probabilities < threshold)
        else:
            valid_losses = pixel_losses[valid]
            hardest = valid_losses.topk(min(batch_kept, valid_losses.numel())).indices
            kept_valid = torch.zeros_like(valid_losses, dtype=torch.bool)
            kept_valid[hardest] = True
            kept[valid] = kept_valid
    total = pixel_losses[kept].sum()
    return total / (labels.numel() if loss_reduction == "all_pixels" else kept.sum().clamp(min=1))


def check_recipe(recipe: RecipeArguments, mask_classification: bool) -> None:
    """Raise a ValueError where `recipe` does not apply to the model (OHEM to mask classification models)."""
    if mask_classification and recipe.ohem:
        raise ValueError(
            "OHEM (--ohem) applies to SeMask-FPN's per-pixel logits; SeMask-Mask2Former trains with its mask "
            "classification losses. Train without --ohem."
        )


class SemaskTrainer(Trainer):
    """`Trainer` with the original optimiser groups, encoder learning-rate factor, poly schedule with warm-up and
    optional OHEM loss, for SeMask-FPN and SeMask-Mask2Former.

    SeMask-Mask2Former: only `labels` count as labels (unless `args.label_names` say otherwise; the model's
    `mask_labels` / `class_labels` are built from them), evaluation gathers the class and mask predictions and turns
    them into per-class scores at the labels' size (`semantic_scores_for_metrics`, unless
    `preprocess_logits_for_metrics` is given), and OHEM is refused.

    Multi-process runs: on GPUs the decode head's BatchNorms become `SyncBatchNorm`, as in the original (torch has
    no CPU version; there each process keeps its own running statistics). Every evaluation first copies the main
    process's BatchNorm statistics to the others, so all processes evaluate the model that gets saved. Evaluation
    gathers only the logits, and pads each batch to the largest size across processes first (images with 0,
    labels with 255), as gathering needs equal sizes.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, *, recipe: RecipeArguments, **kwargs):
        self.mask_classification = is_mask_classification(model)
        check_recipe(recipe, self.mask_classification)
        if self.mask_classification:
            kwargs.setdefault("preprocess_logits_for_metrics", semantic_scores_for_metrics)
        if recipe.sync_batch_norm and args.world_size > 1 and args.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        super().__init__(model, args, **kwargs)
        self.recipe = recipe
        if args.label_names is None:
            self.label_names = ["labels"]

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        if not self.recipe.original_weight_decay_groups:
            return super().get_decay_parameter_names(model)
        excluded = no_weight_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters() if name not in excluded]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or self.recipe.backbone_lr_multiplier == 1:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        scale_encoder_learning_rate(
            optimizer, self.model if model is None else model, self.recipe.backbone_lr_multiplier
        )
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not self.recipe.poly_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        factor = functools.partial(
            poly_warmup_factor,
            total_steps=num_training_steps,
            warmup_steps=self.args.get_warmup_steps(num_training_steps),
            warmup_ratio=self.recipe.warmup_ratio,
            power=self.recipe.poly_power,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.recipe.ohem:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        outputs = model(pixel_values=inputs["pixel_values"])
        semask = self.accelerator.unwrap_model(model)
        semask.check_labels(labels, inputs["pixel_values"])
        config = semask.config
        logits = F.interpolate(
            outputs.logits, size=labels.shape[-2:], mode="bilinear", align_corners=config.align_corners
        )
        loss = ohem_cross_entropy(
            logits,
            labels,
            ignore_index=config.semantic_loss_ignore_index,
            threshold=self.recipe.ohem_threshold,
            min_kept=self.recipe.ohem_min_kept,
            loss_reduction=config.loss_reduction,
        )
        if outputs.semantic_logits is not None:
            loss = loss + semask.losses(outputs.logits, outputs.semantic_logits, labels)[1]
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        if self.accelerator.num_processes > 1:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        if self.accelerator.num_processes > 1:
            inputs = {**inputs, **self._padded_across_processes(inputs["pixel_values"], inputs["labels"])}
        if ignore_keys is None:
            ignore_keys = MASK2FORMER_EVAL_IGNORED_OUTPUTS if self.mask_classification else EVAL_IGNORED_OUTPUTS
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def _padded_across_processes(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        for dim in (-2, -1):
            pixel_values = self.accelerator.pad_across_processes(pixel_values, dim=pixel_values.ndim + dim)
            labels = self.accelerator.pad_across_processes(labels, dim=labels.ndim + dim, pad_index=IGNORE_INDEX)
        return {"pixel_values": pixel_values, "labels": labels}
