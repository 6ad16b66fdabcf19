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

SeMask-MiT (SegFormer's mmseg 0.x ADE20K configs, which the design follows as it does SeMask-Swin): AdamW at 6e-5
with weight decay 0.01 (none on LayerNorms), the decode head at 10x that rate, poly decay (power 1) after 1500
linear warm-up steps, SeMask-FPN's augmentation. The script expresses the head's 10x as `learning_rate` 6e-4 and
`backbone_lr_multiplier` 0.1 for the encoder (its semantic blocks included), which gives every parameter the same
learning rate and decoupled weight decay as SegFormer's optimiser.

Modules: `arguments` (the script's `ModelArguments` and `RecipeArguments`), `init` (model initialisation),
`augmentation` (transforms, dataset transforms, collator) and `trainer` (`SemaskTrainer`, optimiser groups, schedule,
OHEM).
"""

from .arguments import ModelArguments, RecipeArguments
from .augmentation import (
    CatMaxRatioRandomCrop,
    EvalTransform,
    PadToSize,
    PhotometricDistortion,
    RandomRescale,
    TrainTransform,
    build_train_augmentation,
    label_map,
    normalization_constants,
    pad_collate,
)
from .init import (
    TINY_CONFIG,
    TINY_MASK2FORMER_CONFIG,
    TINY_MASKFORMER_CONFIG,
    TINY_MIT_CONFIG,
    InitialisationReport,
    initialise_model,
    preset_config,
    resolve_model_type,
)
from .trainer import (
    SemaskTrainer,
    check_recipe,
    no_weight_decay_parameter_names,
    ohem_cross_entropy,
    poly_warmup_factor,
    semantic_scores_for_metrics,
)

__all__ = [
    "TINY_CONFIG",
    "TINY_MASK2FORMER_CONFIG",
    "TINY_MASKFORMER_CONFIG",
    "TINY_MIT_CONFIG",
    "CatMaxRatioRandomCrop",
    "EvalTransform",
    "InitialisationReport",
    "ModelArguments",
    "PadToSize",
    "PhotometricDistortion",
    "RandomRescale",
    "RecipeArguments",
    "SemaskTrainer",
    "TrainTransform",
    "build_train_augmentation",
    "check_recipe",
    "initialise_model",
    "label_map",
    "no_weight_decay_parameter_names",
    "normalization_constants",
    "ohem_cross_entropy",
    "pad_collate",
    "poly_warmup_factor",
    "preset_config",
    "resolve_model_type",
    "semantic_scores_for_metrics",
]
