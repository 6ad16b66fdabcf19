#!/usr/bin/env python
"""Fine-tune SeMask, SeMask-Mask2Former, SeMask-MaskFormer or SeMask-MiT on a segmentation dataset with transformers'
Trainer and the original training recipes.

    python scripts/train_semask.py --dataset_name demo --output_dir semask-demo      # CPU demo, a few minutes
    python scripts/train_semask.py --dataset_name demo --model_type semask_mask2former --output_dir m2f-demo
    python scripts/train_semask.py --dataset_name demo --model_type semask_mit --output_dir mit-demo
    python scripts/train_semask.py --dataset_name ADEChallengeData2016 --model_name_or_path \\
        microsoft/swin-tiny-patch4-window7-224 --output_dir semask-tiny-ade --max_steps 80000 --bf16 True
    accelerate launch scripts/train_semask.py ...   # or torchrun --nproc_per_node N scripts/train_semask.py ...

Arguments: `semask.training.ModelArguments` and `RecipeArguments`, `semask.data.DatasetArguments` and
`transformers.TrainingArguments` (`--help` lists them all). Unless given on the command line, the original
recipe's settings apply: SeMask-FPN's (lr 1e-4, weight decay 1e-4, 1500 warm-up steps); for SeMask-Mask2Former
(`--model_type semask_mask2former`, a Mask2Former preset or checkpoint) Mask2Former's (`MASK2FORMER_DEFAULTS` and
its test-time resize for ADE20K / Cityscapes); for SeMask-MaskFormer (`--model_type semask_maskformer`) the released
SeMask-L MaskFormer config's (`MASKFORMER_DEFAULTS`, the same test-time resize); for SeMask-MiT
(`--model_type semask_mit`, a MiT preset, a SeMask-MiT or SegFormer checkpoint) SegFormer's (`MIT_DEFAULTS`: the
head at `--learning_rate`, the encoder at 0.1x that). `--dataset_name demo` also selects
demo-sized settings (`DEMO_DEFAULTS`: a tiny model, small crops, a short schedule). The output folder gets the model,
its image processor, a model card (README.md), `eval_results.json`, `training_curves.png` and overlay PNGs of a few
validation predictions (`predictions/`).

`--resume_from_checkpoint OUTPUT_DIR/checkpoint-N` (or `True`: the newest checkpoint in `--output_dir`) continues an
interrupted run where it stopped (weights, optimiser, schedule and random states), reaching the weights of an
uninterrupted run; a truncated or corrupt checkpoint is refused before training, naming the newest intact earlier one.
A NaN or infinite training loss stops the run before the weights take it in, naming the step and the batch.
"""

import json
import logging
import os
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments, set_seed

import semask  # noqa: F401  (importing semask registers its models with the Auto classes)
from semask.allocator import keep_freed_memory
from semask.cli import overlay_image
from semask.data import (
    DatasetArguments,
    DatasetValidationError,
    load_segmentation_data,
    undecoded,
    validate_segmentation_data,
)
from semask.image_processing_semask import SemaskImageProcessor, upright_rgb
from semask.inference import is_mask_classification, predict_probabilities
from semask.label_files import LabelsFileError
from semask.metrics import compute_metrics_for_trainer
from semask.modelcard import write_model_card
from semask.palettes import palette_for_labels
from semask.presets import DATASET_PROCESSING, MASK2FORMER_PROCESSING
from semask.training import (
    EvalTransform,
    ModelArguments,
    RecipeArguments,
    SemaskTrainer,
    TrainTransform,
    check_recipe,
    initialise_model,
    pad_collate,
    resolve_model_type,
)
from semask.training.trainer import CheckpointError, NonFiniteLossError, resolve_resume_checkpoint

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402  (after choosing the non-interactive backend)

logger = logging.getLogger("train_semask")

ARGUMENT_CLASSES = (ModelArguments, DatasetArguments, RecipeArguments, TrainingArguments)
# The original recipe's optimiser settings (SeMask-FPN ADE20K / COCO-Stuff configs) and sensible Trainer settings.
RECIPE_DEFAULTS = {
    "learning_rate": 1e-4,
    "weight_decay": 1e-4,
    "warmup_steps": 1500,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_steps": 50,
}
# The original Mask2Former recipe (its ADE20K / Cityscapes base configs and `train_net.py`), for SeMask-Mask2Former.
MASK2FORMER_DEFAULTS = {
    "weight_decay": 0.05,
    "backbone_lr_multiplier": 0.1,
    "poly_power": 0.9,
    "warmup_steps": 0,
    "max_grad_norm": 0.01,
    "cat_max_ratio": 1.0,
    "pad_pixel_value": 128,
}
# The released SeMask-L MaskFormer config (`maskformer_semask_swin_large_IN21k_384_bs16_160k_res640.yaml` over
# MaskFormer's ADE20K base config): AdamW at 6e-5 with weight decay 0.01 (none on norms and embeddings), the encoder
# at the full rate, 1500 linear warm-up steps from 1e-6, poly decay (power 0.9), full-model gradient clipping at 0.01.
MASKFORMER_DEFAULTS = {
    **MASK2FORMER_DEFAULTS,
    "learning_rate": 6e-5,
    "weight_decay": 0.01,
    "backbone_lr_multiplier": 1.0,
    "warmup_steps": 1500,
}
# SegFormer's mmseg 0.x ADE20K recipe, for SeMask-MiT: AdamW at 6e-5 with weight decay 0.01 and the decode head at
# 10x (here: the head at 6e-4, the encoder at 0.1x, the same rates and decoupled decay), poly decay (power 1) after
# 1500 linear warm-up steps from 1e-6.
MIT_DEFAULTS = {"learning_rate": 6e-4, "backbone_lr_multiplier": 0.1, "weight_decay": 0.01, "warmup_steps": 1500}
# The recipe defaults of the model kinds other than SeMask-FPN.
MODEL_DEFAULTS = {
    "semask_mask2former": MASK2FORMER_DEFAULTS,
    "semask_maskformer": MASKFORMER_DEFAULTS,
    "semask_mit": MIT_DEFAULTS,
}
MASK_CLASSIFICATION_KINDS = ("semask_mask2former", "semask_maskformer")
# `--dataset_name demo`: a tiny model trained for a few minutes on the CPU (where no GPU is available).
DEMO_PRESET = "tiny"
DEMO_DEFAULTS = {
    "image_scale": [512, 128],
    "crop_size": [64],
    "num_train_epochs": 16,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_steps": 40,
    "logging_steps": 10,
    "save_strategy": "no",
    "use_cpu": not torch.cuda.is_available(),
}
# The demo's SeMask-Mask2Former (and SeMask-MaskFormer) keeps Mask2Former's weight decay and schedule (over
# DEMO_DEFAULTS' ones); its randomly initialised encoder learns at the full rate, and the rate is higher (it learns the
# demo more slowly than SeMask-FPN).
MASK2FORMER_DEMO_DEFAULTS = {
    "learning_rate": 2e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0,
    "backbone_lr_multiplier": 1.0,
}
# The demo's SeMask-MiT: its randomly initialised encoder learns at the head's rate.
MIT_DEMO_DEFAULTS = {"backbone_lr_multiplier": 1.0}
DEMO_MODEL_DEFAULTS = {
    "semask_mask2former": MASK2FORMER_DEMO_DEFAULTS,
    "semask_maskformer": MASK2FORMER_DEMO_DEFAULTS,
    "semask_mit": MIT_DEMO_DEFAULTS,
}
NUM_PREDICTION_IMAGES = 4


def explicit_options(argv: list[str]) -> set[str]:
    """The option names given in `argv` (dashes as underscores; `--no_x` counts as `x`)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names |= {name, name.removeprefix("no_")}
    return names


def as_arguments(name: str, value) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [f"--{name}", *map(str, values)]


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DatasetArguments, RecipeArguments, TrainingArguments]:
    """Parse `argv`, filling options the user did not give from `RECIPE_DEFAULTS`, `MODEL_DEFAULTS` for the other
    model kinds, and `DEMO_DEFAULTS` and `DEMO_MODEL_DEFAULTS` for the demo data."""
    parser = HfArgumentParser(ARGUMENT_CLASSES, allow_abbrev=False)
    given = explicit_options(argv)
    if "help" in given or "-h" in argv:
        parser.parse_args_into_dataclasses(args=argv)  # prints every argument group's help and exits
    if "output_dir" not in given:
        parser.error("--output_dir is required.")
    data_parser = HfArgumentParser(DatasetArguments, allow_abbrev=False)
    data_args = data_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[0]
    demo = data_args.dataset_name == "demo"
    if demo and not {"preset", "model_name_or_path"} & given:
        argv = [*argv, "--preset", DEMO_PRESET]
    model_parser = HfArgumentParser(ModelArguments, allow_abbrev=False)
    model_args = model_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[0]
    model_type = resolve_model_type(model_args)
    mask_classification = model_type in MASK_CLASSIFICATION_KINDS
    defaults = {
        **RECIPE_DEFAULTS,
        **MODEL_DEFAULTS.get(model_type, {}),
        **(DEMO_DEFAULTS if demo else {}),
        **(DEMO_MODEL_DEFAULTS.get(model_type, {}) if demo else {}),
    }
    for name, value in defaults.items():
        if name not in given:
            argv = [*argv, *as_arguments(name, value)]
    model_args, data_args, recipe, training_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    check_recipe(recipe, mask_classification=mask_classification)
    if training_args.fp16 and training_args.device.type == "cpu":
        raise SystemExit(
            "--fp16 on the CPU: accelerate autocasts to fp16 only on accelerators, so training would run in float32; "
            "pass --bf16 True (CPU autocast) instead, or train on a GPU."
        )
    # Required by the data pipeline (the "image"/"label" columns feed set_transform) and the streaming metric.
    training_args.remove_unused_columns = False
    training_args.batch_eval_metrics = True
    return model_args, data_args, recipe, training_args


def build_image_processor(
    preset: str | None, reduce_labels: bool, recipe: RecipeArguments, mask_classification: bool = False
) -> SemaskImageProcessor:
    """The test-time processor for the data: the dataset preset's pipeline (the detectron2 one of SeMask-Mask2Former
    and SeMask-MaskFormer where it has one, else SeMask-FPN's) or the default one, the recipe's scale and the data's
    label convention."""
    settings = dict((mask_classification and MASK2FORMER_PROCESSING.get(preset)) or DATASET_PROCESSING.get(preset, {}))
    if recipe.image_scale:
        settings["size"] = {"longest_edge": recipe.image_scale[0], "shortest_edge": recipe.image_scale[1]}
    return SemaskImageProcessor(**{**settings, "do_reduce_labels": reduce_labels})


def check_output_dir(training_args: TrainingArguments) -> None:
    """Refuse to write into a non-empty folder unless resuming a run there (nothing the user had is replaced), and
    create the folder now, so that one that cannot be written to is reported before training, not after it."""
    output_dir = Path(training_args.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not training_args.resume_from_checkpoint:
        raise SystemExit(
            f"{output_dir} exists and is not empty: choose a new --output_dir, or pass --resume_from_checkpoint "
            "to continue a run saved there."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # an existing file, a path under a file, no permission
        raise SystemExit(f"Cannot create --output_dir {output_dir}: {error.strerror or error}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise SystemExit(f"Cannot write to --output_dir {output_dir}: permission denied")


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    """Training / validation loss and validation mIoU against the step, side by side."""
    figure, (loss_axes, miou_axes) = pyplot.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "training loss"), ("eval_loss", "validation loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            loss_axes.plot(*zip(*points), marker="." if key == "eval_loss" else None, label=label)
    loss_axes.set(xlabel="step", ylabel="loss", title="Loss")
    loss_axes.legend()
    points = [(entry["step"], entry["eval_mean_iou"]) for entry in log_history if "eval_mean_iou" in entry]
    if points:
        miou_axes.plot(*zip(*points), marker="o")
    miou_axes.set(xlabel="step", ylabel="mIoU", title="Validation mIoU", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def save_prediction_overlays(model, processor, dataset, id2label: dict[int, str], folder: Path) -> None:
    """Segment the first validation images (whole-image inference) and save the predictions over them."""
    folder.mkdir(parents=True, exist_ok=True)
    palette = palette_for_labels(id2label)
    model.eval()
    for index in range(min(NUM_PREDICTION_IMAGES, len(dataset))):
        image = upright_rgb(dataset[index]["image"])
        label_map = predict_probabilities(model, processor, image).argmax(0).cpu().numpy()
        overlay_image(image, label_map, palette, alpha=0.5).save(folder / f"validation_{index}_overlay.png")


def training_summary(source: str, data_name: str, recipe: RecipeArguments, args: TrainingArguments, steps: int) -> str:
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    warmup_steps = args.get_warmup_steps(steps)
    warmup = f"{warmup_steps} linear warm-up steps" if warmup_steps else "no warm-up"
    schedule = (
        f"poly (power {recipe.poly_power}) with {warmup}"
        if recipe.poly_schedule
        else f"{args.lr_scheduler_type} schedule"
    )
    settings = [schedule]
    if recipe.backbone_lr_multiplier != 1:
        settings.append(f"encoder learning rate x{recipe.backbone_lr_multiplier}")
    if args.max_grad_norm:
        settings.append(f"gradient norm clipped at {args.max_grad_norm}")
    if recipe.ohem:
        settings.append("OHEM")
    return (
        f"Trained with `scripts/train_semask.py` from {source} on {data_name} for {steps} steps: batch {batch}, "
        f"crop {recipe.crop_size[0]}x{recipe.crop_size[1]}, AdamW (lr {args.learning_rate}, weight decay "
        f"{args.weight_decay}), {', '.join(settings)}."
    )


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository rather than a local folder."""
    return name_or_path if name_or_path and not Path(name_or_path).exists() else None


def dataset_title(dataset_name: str | None) -> str:
    """How the model card names the data: a Hub id, a local folder's name, or the demo's or folder pairs' name."""
    if dataset_name == "demo":
        return "semask-demo"
    if dataset_name is None:
        return "custom image/label folders"
    return hub_id(dataset_name) or Path(dataset_name).resolve().name


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, evaluate and save; returns the final evaluation metrics. Unusable data (a `DatasetValidationError`
    or `LabelsFileError`, also when training reaches a file that cannot be decoded) or an unusable
    `--resume_from_checkpoint` (`CheckpointError`) exits with `error: <message>` on stderr, status 2; a non-finite
    training loss (`NonFiniteLossError`, naming the step and batch) with status 1."""
    try:
        return train(argv)
    except (DatasetValidationError, LabelsFileError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def train(argv: list[str] | None = None) -> dict[str, float]:
    """`main` without its error handling."""
    model_args, data_args, recipe, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not training_args.should_log:
        logging.getLogger().setLevel(logging.WARNING)
    transformers.logging.set_verbosity(training_args.get_process_log_level())
    check_output_dir(training_args)
    if training_args.resume_from_checkpoint:  # "True": the newest checkpoint of --output_dir
        training_args.resume_from_checkpoint = resolve_resume_checkpoint(
            training_args.resume_from_checkpoint, training_args.output_dir
        )
    set_seed(training_args.seed)
    if recipe.keep_freed_memory or (recipe.keep_freed_memory is None and training_args.device.type == "cpu"):
        keep_freed_memory()

    data = load_segmentation_data(data_args)
    validate_segmentation_data(data, data_args.label_check_samples, seed=training_args.seed)
    model, report = initialise_model(model_args, data.id2label)
    processor = build_image_processor(data.preset, data.reduce_labels, recipe, is_mask_classification(model))
    logger.info("%s", report)

    trainer = SemaskTrainer(
        model=model,
        args=training_args,
        # Undecoded, so that the transforms decode the files and name one they cannot decode.
        train_dataset=undecoded(data.dataset["train"]).with_transform(
            TrainTransform(processor, recipe, num_labels=data.num_labels)
        ),
        eval_dataset=undecoded(data.dataset["validation"]).with_transform(
            EvalTransform(processor, num_labels=data.num_labels)
        ),
        data_collator=pad_collate,
        processing_class=processor,
        compute_metrics=compute_metrics_for_trainer(data.num_labels),
        recipe=recipe,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        data_name = dataset_title(data_args.dataset_name)
        write_model_card(
            output_dir,
            trainer.model.config,
            eval_results=metrics,
            dataset_name=data_name,
            base_model=hub_id(model_args.model_name_or_path),
            training_summary=training_summary(
                report.source, data_name, recipe, training_args, trainer.state.global_step
            ),
            overwrite=bool(training_args.resume_from_checkpoint),
        )
        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
        save_prediction_overlays(
            trainer.model, processor, data.dataset["validation"], data.id2label, output_dir / "predictions"
        )
        per_class = dict(zip(data.id2label.values(), np.round(metrics["eval_per_category_iou"], 4).tolist()))
        print(f"Per-class IoU: {json.dumps(per_class)}")
        print(f"Validation mIoU: {metrics['eval_mean_iou']:.4f} (model saved to {output_dir})")
    return metrics


if __name__ == "__main__":
    main()
