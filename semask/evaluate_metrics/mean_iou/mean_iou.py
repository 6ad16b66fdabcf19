"""Mean IoU as a local `evaluate` metric: semask's streaming `SegmentationMetric` behind the Hub `mean_iou` interface.

    metric = evaluate.load(semask.metrics.EVALUATE_MEAN_IOU)  # a local folder: works offline
    for predictions, references in batches:
        metric.add_batch(predictions=predictions, references=references)
    results = metric.compute(num_labels=150, ignore_index=255, reduce_labels=True)

The running state. `evaluate.EvaluationModule.add_batch` writes every batch to an Arrow cache file that `compute` reads
back whole for `_compute`, so memory grows with the evaluation set, and evaluate 0.4 has no hook for a running state
(`MetricInfo.streamable` is only informative). This module therefore overrides `add_batch`, `add` and `compute`: each
batch becomes counts of its (reference, prediction) label pairs, a sparse confusion matrix of the raw label values
(`num_labels`, `label_map` and `reduce_labels` only arrive with `compute`); `compute` maps the reference labels of the
pairs and adds the counts to a `semask.metrics.SegmentationMetric` (`update(..., counts=...)`), whose confusion matrix
gives the metrics, then starts afresh (after an error the counts stay as they were). `_compute(predictions=...,
references=..., ...)` evaluates one set at once and leaves the running state alone.

Arguments and results are those of the Hub `mean_iou` (numpy float64 scalars and per-class arrays; NaN where a class
is absent, or `nan_to_num`; `label_map` reads the original labels, then `reduce_labels` turns 0 into 255 and k into
k - 1). Differences: non-ignored labels outside `[0, num_labels)` raise an error (the Hub metric leaves them out of
some of its histograms), `ignore_index` must not be a class id, `reduce_labels=True` needs `ignore_index=255` (where it
puts label 0), and `num_process > 1` is refused: the counts are not shared between processes (sum the confusion
matrices instead, `SegmentationMetric.compute(across_processes=True)`).
"""

import numbers
from collections import Counter

import datasets
import evaluate
import numpy as np
import torch

from semask.metrics import SegmentationMetric, _as_class_ids

REDUCED_LABEL_IGNORE = 255  # where `reduce_labels` puts label 0, as mmsegmentation and the Hub metric do
LabelPairCounts = Counter[tuple[int, int]]  # (reference value, prediction value) -> number of pixels

_DESCRIPTION = """Mean intersection over union (mIoU) of semantic segmentation label maps, with the mean class accuracy
and the overall pixel accuracy, from pixel counts summed over the whole evaluation set (mmsegmentation's definitions).
Streaming: add_batch keeps only label-pair counts, never the label maps."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: Predicted label maps, one per image (2-D integer numpy arrays, tensors, PIL images or nested lists;
        or one (batch, height, width) array). Sizes may differ between images.
    references: The ground-truth label maps, each of its prediction's size.
    num_labels (`int`): Number of classes; class ids are 0 .. num_labels - 1.
    ignore_index (`int`): Reference label of pixels left out (not a class id; 255 with reduce_labels).
    nan_to_num (`float`, *optional*): Replaces NaN (undefined) results.
    label_map (`dict[int, int]`, *optional*): Maps reference labels (read from the original labels) to new ones.
    reduce_labels (`bool`, defaults to `False`): After label_map, reference label 0 becomes 255 (ignored) and k
        becomes k - 1 (ADE20K-style annotations).
Returns:
    mean_iou, mean_accuracy, overall_accuracy (`numpy.float64`) and per_category_iou, per_category_accuracy
    (`numpy.ndarray` of shape (num_labels,)). A class absent from predictions and references has IoU NaN, a class
    absent from the references accuracy NaN; the means leave NaN out.
"""

_CITATION = """@misc{mmsegmentation2020,
  title={{MMSegmentation}: OpenMMLab Semantic Segmentation Toolbox and Benchmark},
  author={{MMSegmentation Contributors}},
  howpublished={\\url{https://github.com/open-mmlab/mmsegmentation}},
  year={2020}
}"""


class MeanIoU(evaluate.Metric):
    """The Hub `mean_iou` metric's interface on semask's confusion-matrix metric, with a running state."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.num_process != 1:
            raise ValueError(
                "This mean_iou keeps its counts in memory, one process each: load it with num_process=1 and sum the "
                "processes' confusion matrices (semask.metrics.SegmentationMetric.compute(across_processes=True))"
            )
        self._pair_counts: LabelPairCounts = Counter()

    def _info(self) -> evaluate.MetricInfo:
        label_maps = datasets.List(datasets.List(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": label_maps, "references": label_maps}),
            reference_urls=[
                "https://github.com/open-mmlab/mmsegmentation/blob/v0.30.0/mmseg/core/evaluation/metrics.py"
            ],
            streamable=True,
        )

    def add_batch(self, *, predictions, references) -> None:
        """Add predicted label maps and their references to the running counts."""
        self._pair_counts.update(count_label_pairs(predictions, references))

    def add(self, *, prediction, reference) -> None:
        """Add one predicted label map and its reference to the running counts."""
        self.add_batch(predictions=[prediction], references=[reference])

    def compute(
        self,
        *,
        predictions=None,
        references=None,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        """The metrics of everything added since the last `compute`, and of `predictions` / `references` if given;
        then starts afresh. An error leaves the running counts as they were."""
        if (predictions is None) != (references is None):
            raise ValueError("pass both predictions and references, or neither")
        metric = segmentation_metric(num_labels, ignore_index, label_map, reduce_labels)
        pair_counts = self._pair_counts
        if predictions is not None:
            pair_counts = pair_counts + count_label_pairs(predictions, references)
        results = metrics_from_counts(metric, pair_counts, label_map, reduce_labels, nan_to_num)
        self._pair_counts = Counter()
        return results

    def _compute(
        self,
        *,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        """The metrics of `predictions` / `references` alone (the running counts are left as they are)."""
        metric = segmentation_metric(num_labels, ignore_index, label_map, reduce_labels)
        pair_counts = count_label_pairs(predictions, references)
        return metrics_from_counts(metric, pair_counts, label_map, reduce_labels, nan_to_num)


def count_label_pairs(predictions, references) -> LabelPairCounts:
    """How many pixels have each (reference, prediction) pair of label values, over a batch of label maps."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    flat_predictions, flat_references = [], []
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        prediction = _as_class_ids(prediction, "predictions")
        reference = _as_class_ids(reference, "references").to(prediction.device)
        if prediction.shape != reference.shape:
            raise ValueError(
                f"prediction {index} has shape {tuple(prediction.shape)} but its reference {tuple(reference.shape)}"
            )
        flat_predictions.append(prediction.reshape(-1))
        flat_references.append(reference.reshape(-1))
    if not sum(flat.numel() for flat in flat_predictions):
        return Counter()
    predictions, references = torch.cat(flat_predictions), torch.cat(flat_references)
    # One code per pair of values, counted with `unique`: the values' ranges need not be known beforehand.
    low_reference, low_prediction = int(references.min()), int(predictions.min())
    width = int(predictions.max()) - low_prediction + 1
    if (int(references.max()) - low_reference + 1) * width > 2**62:
        raise ValueError("label values span too wide a range to be counted as pairs (more than 2**62 pairs)")
    codes = (references - low_reference) * width + predictions - low_prediction
    codes, counts = torch.unique(codes, return_counts=True)
    pairs = zip((codes // width + low_reference).tolist(), (codes % width + low_prediction).tolist())
    return Counter(dict(zip(pairs, counts.tolist())))


def segmentation_metric(
    num_labels: int, ignore_index: int, label_map: dict[int, int] | None, reduce_labels: bool
) -> SegmentationMetric:
    """An empty `SegmentationMetric` for these settings, once they are checked."""
    if reduce_labels and ignore_index != REDUCED_LABEL_IGNORE:
        raise ValueError(
            f"reduce_labels=True turns reference label 0 into {REDUCED_LABEL_IGNORE}; pass "
            f"ignore_index={REDUCED_LABEL_IGNORE} (got {ignore_index})"
        )
    if label_map is not None and not all(
        isinstance(old, numbers.Integral) and isinstance(new, numbers.Integral) for old, new in dict(label_map).items()
    ):
        raise TypeError(f"label_map must map integer labels to integer labels, got {label_map!r}")
    return SegmentationMetric(num_labels, ignore_index)


def metrics_from_counts(
    metric: SegmentationMetric,
    pair_counts: LabelPairCounts,
    label_map: dict[int, int] | None,
    reduce_labels: bool,
    nan_to_num: float | None,
) -> dict:
    """Add the label-pair counts (references mapped) to the empty `metric`; its results as the Hub metric gives them."""
    if not pair_counts:
        raise ValueError("no label maps to evaluate: call add_batch or add first, or pass predictions and references")
    pairs = torch.tensor(list(pair_counts), dtype=torch.int64)
    references = map_references(pairs[:, 0], label_map, reduce_labels)
    metric.update(pairs[:, 1], references, counts=torch.tensor(list(pair_counts.values()), dtype=torch.int64))
    results = {
        name: np.array(value) if isinstance(value, list) else np.float64(value)
        for name, value in metric.compute().items()
    }
    if nan_to_num is not None:
        results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
    return results


def map_references(references: torch.Tensor, label_map: dict[int, int] | None, reduce_labels: bool) -> torch.Tensor:
    """Reference labels after `label_map` (every entry reads the original labels), then the label reduction."""
    mapped = references.clone()
    for old, new in (label_map or {}).items():
        mapped[references == old] = new
    if reduce_labels:  # mmsegmentation's rule: 0 -> 255, k -> k - 1, and 255 stays 255
        mapped = mapped.masked_fill(mapped == 0, REDUCED_LABEL_IGNORE) - 1
        mapped = mapped.masked_fill(mapped == REDUCED_LABEL_IGNORE - 1, REDUCED_LABEL_IGNORE)
    return mapped
