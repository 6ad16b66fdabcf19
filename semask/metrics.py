"""Streaming semantic-segmentation metrics (mIoU and accuracies) from a confusion matrix.

The results carry the names of evaluate's `mean_iou` and follow its definitions, which are those of
mmsegmentation 0.x (`mmseg/core/evaluation/metrics.py`, used by the original SeMask), summed over the whole set:

- per-class IoU = intersection / union and per-class accuracy = intersection / reference area, both from pixel
  counts summed over all images; a class with zero union (absent from predictions and references) has IoU NaN,
  a class absent from the references has accuracy NaN; `mean_iou` / `mean_accuracy` are the NaN-ignoring means.
- `overall_accuracy` = correctly predicted pixels / non-ignored pixels.

Differences: predictions or references outside `[0, num_labels)` at non-ignored pixels raise an error here, where
mmseg and evaluate silently leave them out of their histograms; counts are exact int64 (mmseg and evaluate use
float64 histograms); no `label_map` / `reduce_labels` (the image processor reduces labels before this).

`EVALUATE_MEAN_IOU` is the same metric as a local `evaluate` module with the Hub `mean_iou`'s interface (including
`label_map` and `reduce_labels`): `evaluate.load(EVALUATE_MEAN_IOU)`, offline.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional
from transformers import EvalPrediction

TRAINER_LABEL_PAD_VALUE = -100
"""The value `Trainer` pads labels with when it gathers them across processes (`pad_across_processes`)."""
EVALUATE_MEAN_IOU = str(Path(__file__).with_name("evaluate_metrics") / "mean_iou")
"""The local `evaluate` module folder of this metric: `evaluate.load(EVALUATE_MEAN_IOU)` (see its docstring)."""

Metrics = dict[str, float | list[float]]


def _as_class_ids(values: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """`values` as an int64 tensor (a tensor stays on its device); floating-point input is an error."""
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        array = np.asarray(values)  # read-only for a PIL image: copied (torch warns about sharing read-only memory)
        tensor = torch.as_tensor(array if array.flags.writeable else array.copy())
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"{name} must be integer class ids, got dtype {tensor.dtype}; "
            "for logits, take the argmax over the class dimension first"
        )
    return tensor.long()


class SegmentationMetric:
    """mIoU, mean accuracy and overall accuracy accumulated batch by batch in a `(num_labels, num_labels)` matrix.

    Only the confusion matrix (rows: reference class, columns: predicted class) is kept, never the predictions,
    so memory does not grow with the evaluation set. The matrix lives on the device of the last predictions.

    Args:
        num_labels: Number of classes; class ids are `0 .. num_labels - 1`.
        ignore_index: Reference value of pixels left out of every metric (predictions there are not checked).
    """

    def __init__(self, num_labels: int, ignore_index: int = 255) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be a positive number of classes, got {num_labels}")
        if 0 <= ignore_index < num_labels:
            raise ValueError(f"ignore_index ({ignore_index}) must not be a class id in [0, {num_labels})")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion_matrix = torch.zeros((num_labels, num_labels), dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion_matrix = torch.zeros_like(self.confusion_matrix)

    def update(
        self,
        predictions: torch.Tensor | np.ndarray,
        references: torch.Tensor | np.ndarray,
        counts: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Add predicted label maps and their references (integer arrays or tensors of the same shape, any rank).

        Args:
            counts: How many pixels each (prediction, reference) element stands for (non-negative integers of the
                same shape), to add a histogram of label pairs instead of the pixels; default one pixel each.
        """
        predictions = _as_class_ids(predictions, "predictions")
        references = _as_class_ids(references, "references").to(predictions.device)
        counts = None if counts is None else _as_class_ids(counts, "counts").to(predictions.device)
        shapes = [tuple(tensor.shape) for tensor in (predictions, references, counts) if tensor is not None]
        if len(set(shapes)) > 1:
            names = "predictions and references" if counts is None else "predictions, references and counts"
            raise ValueError(f"{names} must have the same shape, got {' and '.join(map(str, shapes))}")
        if counts is not None and (counts < 0).any():
            raise ValueError("counts must be non-negative numbers of pixels")
        valid = references != self.ignore_index
        references, predictions = references[valid], predictions[valid]
        self._check_class_ids(references, "references", f" (ignore_index {self.ignore_index} is also allowed)")
        self._check_class_ids(predictions, "predictions at non-ignored pixels", "")
        codes = references * self.num_labels + predictions
        if counts is None:
            added = torch.bincount(codes, minlength=self.num_labels**2)
        else:
            added = torch.zeros(self.num_labels**2, dtype=torch.int64, device=codes.device)
            added.index_add_(0, codes, counts[valid])
        self.confusion_matrix = self.confusion_matrix.to(added.device) + added.view_as(self.confusion_matrix)

    def _check_class_ids(self, values: torch.Tensor, name: str, allowed_note: str) -> None:
        out_of_range = values[(values < 0) | (values >= self.num_labels)]
        if out_of_range.numel():
            found = torch.unique(out_of_range).tolist()
            shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
            raise ValueError(f"{name} must be class ids in [0, {self.num_labels}){allowed_note}; found {shown}")

    def confusion_matrix_across_processes(self) -> torch.Tensor:
        """The confusion matrix summed over all `torch.distributed` processes (a copy; the local one when
        `torch.distributed` is not initialised). Every process must call it, as for any collective."""
        matrix = self.confusion_matrix.clone()
        if not (dist.is_available() and dist.is_initialized()):
            return matrix
        if matrix.device.type == "cpu" and "gloo" not in str(dist.get_backend()) and torch.accelerator.is_available():
            matrix = matrix.to(torch.accelerator.current_accelerator())  # NCCL and the like reduce device tensors
        dist.all_reduce(matrix)
        return matrix

    def compute(self, *, across_processes: bool = False) -> Metrics:
        """The metrics as plain Python floats and lists (NaN where undefined, see the module docstring).

        Args:
            across_processes: Sum the matrices of all `torch.distributed` processes first. Use it when each
                process updated with its own share of the data; leave it off when every process already saw
                everything (as with `compute_metrics_for_trainer`), which would otherwise count pixels twice.
        """
        matrix = self.confusion_matrix_across_processes() if across_processes else self.confusion_matrix
        matrix = matrix.double()
        intersection = matrix.diagonal()
        reference_area = matrix.sum(dim=1)
        union = reference_area + matrix.sum(dim=0) - intersection
        iou = intersection / union
        accuracy = intersection / reference_area
        return {
            "mean_iou": iou.nanmean().item(),
            "mean_accuracy": accuracy.nanmean().item(),
            "overall_accuracy": (intersection.sum() / reference_area.sum()).item(),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }


def compute_metrics_for_trainer(
    num_labels: int, ignore_index: int = 255
) -> Callable[[EvalPrediction, bool], Metrics | None]:
    """A `compute_metrics` for `Trainer` with `TrainingArguments(batch_eval_metrics=True)`.

    Each call upsamples the batch's logits `(batch, num_labels, h, w)` bilinearly (`align_corners=False`) to the
    labels' size `(batch, H, W)`, takes the argmax and adds it to a `SegmentationMetric`; the call with
    `compute_result=True` (the last batch) returns the metrics and starts afresh. Logits may come as a tuple of
    model outputs (the first is used). Label pixels equal to `ignore_index` or to -100 (Trainer's padding) are
    ignored.

    Distributed evaluation: in transformers 5.23, `Trainer.evaluation_loop` pads logits and labels across
    processes and gathers them with `accelerator.gather_for_metrics` *before* calling `compute_metrics` (which
    also drops the samples duplicated to even out the last batch), so every process sees every batch and the
    metrics are computed without a further reduction across processes. All processes' batches must therefore
    share one logits size, as the gather requires.
    """
    metric = SegmentationMetric(num_labels, ignore_index)

    def compute_metrics(eval_pred: EvalPrediction, compute_result: bool | None = None) -> Metrics | None:
        if compute_result is None:
            raise TypeError(
                "compute_metrics_for_trainer(...) needs TrainingArguments(batch_eval_metrics=True): "
                "Trainer must pass compute_result"
            )
        logits = eval_pred.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = torch.as_tensor(logits)
        labels = _as_class_ids(eval_pred.label_ids, "labels").to(logits.device)
        if logits.ndim != 4 or labels.ndim != 3 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                "expected logits of shape (batch, num_labels, height, width) and labels of shape "
                f"(batch, height, width), got {tuple(logits.shape)} and {tuple(labels.shape)}"
            )
        if logits.shape[1] != num_labels:
            raise ValueError(f"logits have {logits.shape[1]} classes, expected num_labels={num_labels}")
        labels = labels.masked_fill(labels == TRAINER_LABEL_PAD_VALUE, ignore_index)
        logits = functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        metric.update(logits.argmax(dim=1), labels)
        if not compute_result:
            return None
        results = metric.compute()
        metric.reset()
        return results

    return compute_metrics
