"""`SemaskTrainer`: `Trainer` with the original optimiser groups, poly schedule, OHEM, evaluation outputs and a guard
against non-finite losses; checks of the checkpoints a run resumes from."""

import functools
import json
import logging
import re
import zipfile
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ModelOutput

from ..image_processing_semask import IGNORE_INDEX
from ..inference import is_mask_classification, semantic_inference
from ..modeling_semask import SemaskModel
from ..modeling_semask_mask2former import SemaskMask2FormerForUniversalSegmentationOutput
from ..modeling_semask_maskformer import SemaskMaskFormerForInstanceSegmentationOutput
from ..modeling_semask_mit import SemaskMitModel
from .arguments import RecipeArguments

logger = logging.getLogger(__name__)

# Normalisation layers whose running statistics the training forward pass updates.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
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
MASK2FORMER_EVAL_IGNORED_OUTPUTS = sorted(
    {
        output.name
        for output_class in (
            SemaskMask2FormerForUniversalSegmentationOutput,
            SemaskMaskFormerForInstanceSegmentationOutput,
        )
        for output in fields(output_class)
    }
    - set(MASK2FORMER_EVAL_OUTPUTS)
)


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
    """Move the encoder's (SeMask-Swin's or SeMask-MiT's) parameters of each parameter group of `optimizer` into a
    copy of that group whose learning rate is `multiplier` times the group's (the original Mask2Former's backbone
    multiplier; SeMask-MiT's 0.1 against its head's 10x)."""
    encoder_ids = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, (SemaskModel, SemaskMitModel))
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


class NonFiniteLossError(RuntimeError):
    """A training step whose loss is NaN or infinite, raised before the optimiser step, so the weights keep their last
    finite values; the message names the step and describes the batch (saved to the output folder)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it, what is wrong, and an intact earlier one."""


def checkpoint_step(folder: str | Path) -> int | None:
    """The step of a Trainer checkpoint folder (`checkpoint-<step>`), or None for another name."""
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", Path(folder).name)
    return int(match.group(1)) if match else None


def checkpoint_problems(folder: str | Path) -> list[str]:
    """What keeps a Trainer checkpoint folder from being resumed exactly (empty when nothing): a missing or unreadable
    trainer state, weights (safetensors headers and sizes checked), optimiser or scheduler state, and torch archives
    (pytorch_model.bin, optimizer.pt, rng_state.pth, ...) that are truncated or fail their CRC check."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            problems.append(f"{TRAINER_STATE_NAME} has no global_step")
    except (OSError, ValueError) as error:
        problems.append(f"{TRAINER_STATE_NAME} cannot be read ({error})")
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
    has_sub_states = any(path.is_dir() for path in folder.iterdir())  # DeepSpeed / FSDP keep their own states
    if not weights and not has_sub_states:
        problems.append("it has no model weights (model.safetensors)")
    for name in (OPTIMIZER_NAME, SCHEDULER_NAME):
        if not (folder / name).is_file() and not has_sub_states:
            problems.append(f"{name} is missing (saved with --save_only_model? Such a checkpoint cannot be resumed)")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (OSError, SafetensorError) as error:
            problems.append(f"{path.name} is truncated or corrupt ({error})")
    for path in sorted(p for pattern in ("*.pt", "*.pth", "*.bin") for p in folder.glob(pattern)):
        try:
            with zipfile.ZipFile(path) as archive:
                corrupt = archive.testzip()
            if corrupt is not None:
                problems.append(f"{path.name} is corrupt (CRC check of {corrupt} failed)")
        except (OSError, zipfile.BadZipFile) as error:
            problems.append(f"{path.name} is truncated or not a torch archive ({error})")
    return problems


def resolve_resume_checkpoint(value: str, output_dir: str | Path) -> str:
    """The checkpoint folder that `--resume_from_checkpoint value` names ("True": the newest `checkpoint-<step>` in
    `output_dir`), checked by `checkpoint_problems`; a `CheckpointError` naming what is wrong and the newest intact
    earlier checkpoint of its folder otherwise."""
    if value.lower() == "true":
        checkpoints = sorted_checkpoints(output_dir)
        if not checkpoints:
            raise CheckpointError(f"--resume_from_checkpoint True: no {PREFIX_CHECKPOINT_DIR}-<step> in {output_dir}.")
        folder = checkpoints[0]
    else:
        folder = Path(value)
    problems = checkpoint_problems(folder)
    if not problems:
        epoch = json.loads((folder / TRAINER_STATE_NAME).read_text()).get("epoch")
        if epoch is not None and not float(epoch).is_integer():
            logger.warning(
                "%s was saved in the middle of epoch %d: weights, optimiser, schedule and data order continue "
                "exactly, but the random augmentation of the next batch differs from an uninterrupted run "
                "(transformers restores the random state after fetching it); checkpoints at the end of an epoch "
                "(--save_strategy epoch) resume exactly.",
                folder,
                int(epoch) + 1,
            )
        return str(folder)
    step = checkpoint_step(folder)
    earlier = [c for c in sorted_checkpoints(folder.parent) if step is None or checkpoint_step(c) < step]
    intact = next((checkpoint for checkpoint in earlier if not checkpoint_problems(checkpoint)), None)
    hint = (
        f"The newest intact earlier checkpoint is {intact}: pass --resume_from_checkpoint {intact}"
        if intact
        else f"No earlier checkpoint in {folder.parent} is intact"
    )
    raise CheckpointError(f"Cannot resume from {folder}: {'; '.join(problems)}. {hint}.")


def sorted_checkpoints(folder: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders in `folder`, newest (highest step) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def check_recipe(recipe: RecipeArguments, mask_classification: bool) -> None:
    """Raise a ValueError where `recipe` does not apply to the model (OHEM to mask classification models)."""
    if mask_classification and recipe.ohem:
        raise ValueError(
            "OHEM (--ohem) applies to SeMask-FPN's per-pixel logits; SeMask-Mask2Former and SeMask-MaskFormer train "
            "with their mask classification losses. Train without --ohem."
        )


class SemaskTrainer(Trainer):
    """`Trainer` with the original optimiser groups, encoder learning-rate factor, poly schedule with warm-up and
    optional OHEM loss, for SeMask-FPN and SeMask-Mask2Former.

    SeMask-Mask2Former: only `labels` count as labels (unless `args.label_names` say otherwise; the model's
    `mask_labels` / `class_labels` are built from them), evaluation gathers the class and mask predictions and turns
    them into per-class scores at the labels' size (`semantic_scores_for_metrics`, unless
    `preprocess_logits_for_metrics` is given), and OHEM is refused.

    A NaN or infinite training loss raises `NonFiniteLossError` before the optimiser step (`training_step`), naming
    the step and the batch.

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

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
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

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ModelOutput]:
        if not self.recipe.ohem:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        semask = self.accelerator.unwrap_model(model)
        semask.check_labels(labels, inputs["pixel_values"])
        outputs = model(pixel_values=inputs["pixel_values"])
        config = semask.config
        loss = ohem_cross_entropy(
            semask.upsampled(outputs.logits, labels.shape[-2:]),
            labels,
            ignore_index=config.semantic_loss_ignore_index,
            threshold=self.recipe.ohem_threshold,
            min_kept=self.recipe.ohem_min_kept,
            loss_reduction=config.loss_reduction,
        )
        if outputs.semantic_logits is not None:
            loss = loss + semask.semantic_loss(outputs.semantic_logits, labels)
        return (loss, outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step` (forward, backward), then a `NonFiniteLossError` if the loss is NaN or infinite
        on any process, before the optimiser step could carry it into the weights; the BatchNorm running statistics,
        which the forward pass updated, are restored."""
        statistics = [
            (buffer, buffer.clone())
            for module in model.modules()
            if isinstance(module, BATCH_NORMS)
            for buffer in module.buffers(recurse=False)
        ]
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all().to(torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:  # every process stops, none waits for the others in a collective
            finite = self.accelerator.gather(finite)
        if finite.min() < 1:
            with torch.no_grad():
                for buffer, saved in statistics:
                    buffer.copy_(saved)
            raise NonFiniteLossError(self._non_finite_loss_report(loss, inputs))
        return loss

    def _non_finite_loss_report(self, loss: torch.Tensor, inputs: dict[str, torch.Tensor]) -> str:
        """The step, the loss and this process's batch (described, and saved to the output folder by process 0)."""
        step = self.state.global_step + 1
        tensors = {name: value.detach().cpu() for name, value in inputs.items() if isinstance(value, torch.Tensor)}
        batch = []
        if (pixel_values := tensors.get("pixel_values")) is not None:
            non_finite = pixel_values.numel() - int(torch.isfinite(pixel_values).sum())
            batch.append(f"pixel_values {tuple(pixel_values.shape)} with {non_finite} non-finite values")
        if (labels := tensors.get("labels")) is not None:
            values = torch.unique(labels).tolist()
            batch.append(f"labels with the values {values[:12]}{' ...' if len(values) > 12 else ''}")
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / f"non_finite_batch_step_{step}.pt"
            index = 1
            while path.exists():  # never replace the batch of an earlier report
                path, index = path.with_name(f"non_finite_batch_step_{step}_{index}.pt"), index + 1
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(tensors, path)
                batch.append(f"saved to {path}")
            except OSError as error:
                batch.append(f"not saved: {error}")
        where = "not finite on another process" if torch.isfinite(loss).all() else loss.item()
        return (
            f"The training loss is {where} at step {step} (epoch {self.state.epoch or 0:.2f}); this process's batch: "
            f"{'; '.join(batch)}. The weights were not updated with it: fix the data or lower the learning rate, "
            "then resume from the last checkpoint (--resume_from_checkpoint)."
        )

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        if self.accelerator.num_processes > 1:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        return super().evaluate(*args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
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
