"""Command-line arguments of the training script: where the model comes from and the recipe's settings."""

from dataclasses import dataclass, field

from ..configuration_semask import SemaskConfig
from ..configuration_semask_mask2former import PIXEL_DECODERS, SemaskMask2FormerConfig
from ..configuration_semask_maskformer import SemaskMaskFormerConfig
from ..configuration_semask_mit import SemaskMitConfig

MODEL_NAMES = {
    SemaskConfig.model_type: "SeMask",
    SemaskMask2FormerConfig.model_type: "SeMask-Mask2Former",
    SemaskMaskFormerConfig.model_type: "SeMask-MaskFormer",
    SemaskMitConfig.model_type: "SeMask-MiT",
}
"""The model kinds the training script trains (`--model_type`), with their display names."""


@dataclass
class ModelArguments:
    """Where the model's weights come from (command-line arguments of the training script)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A SeMask, SeMask-Mask2Former, SeMask-MaskFormer or SeMask-MiT model folder or Hub id (a different "
            "label set re-initialises the class projections of the semantic layers and the classifier), a "
            "transformers Swin checkpoint (encoder only) or a SegFormer / MiT one (SeMask-MiT: its encoder, and its "
            "MLP head where it fits)."
        },
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "Random weights in a released architecture "
            f"({', '.join(SemaskConfig.preset_names + SemaskMask2FormerConfig.preset_names)}, "
            f"{', '.join(SemaskMaskFormerConfig.preset_names + SemaskMitConfig.preset_names)}) or 'tiny' (a small "
            "demo model); the label set comes from the data."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": f"The model to train: {', '.join(f'{key} ({name})' for key, name in MODEL_NAMES.items())}. "
            "Default: the checkpoint's or preset's kind; SeMask-MiT for SegFormer checkpoints, SeMask (FPN) for Swin "
            "checkpoints and 'tiny'."
        },
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={"help": "Stochastic depth rate (default: the checkpoint's or preset's; 0.3 originally)."},
    )
    pixel_decoder: str | None = field(
        default=None,
        metadata={
            "help": f"SeMask-Mask2Former's pixel decoder ({', '.join(PIXEL_DECODERS)}) for 'tiny' or a Swin "
            "checkpoint. Default: the preset's or checkpoint's; msdeformattn otherwise."
        },
    )

    def __post_init__(self) -> None:
        if self.model_type is not None and self.model_type not in MODEL_NAMES:
            raise ValueError(f"--model_type must be one of {', '.join(MODEL_NAMES)}; got {self.model_type!r}.")
        if self.pixel_decoder is not None and self.pixel_decoder not in PIXEL_DECODERS:
            raise ValueError(f"--pixel_decoder must be one of {', '.join(PIXEL_DECODERS)}; got {self.pixel_decoder!r}.")


@dataclass
class RecipeArguments:
    """Switches and settings of the original training recipe (see `semask.training`)."""

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
    keep_freed_memory: bool | None = field(
        default=None,
        metadata={
            "help": "glibc keeps freed memory for reuse instead of mapping each step's large activations afresh "
            "(`semask.allocator.keep_freed_memory`: fewer page faults, the same numbers; the process keeps its peak "
            "memory). Default: on when training on the CPU."
        },
    )
    sync_batch_norm: bool = field(
        default=True,
        metadata={"help": "Multi-GPU runs: BatchNorm statistics over all processes' batches (the original's SyncBN)."},
    )

    def __post_init__(self) -> None:
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
