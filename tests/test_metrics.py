"""The streaming segmentation metric against a direct numpy computation, the Trainer callable and its errors."""

import json
import math
import socket

import numpy as np
import pytest
import torch
from torch.nn import functional
from transformers import EvalPrediction

from semask.metrics import SegmentationMetric, compute_metrics_for_trainer

IGNORE = 255


def numpy_metrics(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> dict:
    """mIoU etc. class by class from boolean masks, as mmseg / evaluate define them (NaN where 0 / 0)."""
    valid = references != IGNORE
    with np.errstate(invalid="ignore", divide="ignore"):
        intersection = np.array([np.sum(valid & (predictions == c) & (references == c)) for c in range(num_labels)])
        predicted = np.array([np.sum(valid & (predictions == c)) for c in range(num_labels)])
        reference = np.array([np.sum(valid & (references == c)) for c in range(num_labels)])
        iou = intersection / (predicted + reference - intersection)
        accuracy = intersection / reference
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(accuracy),
        "overall_accuracy": intersection.sum() / valid.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(actual[name], dtype=float), value, rtol=1e-12, equal_nan=True, err_msg=name)


def random_maps(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """7 classes: 4 only in references, 5 only in predictions, 6 nowhere; about 10% ignored pixels."""
    references = rng.choice([0, 1, 2, 3, 4], size=shape)
    references[rng.random(shape) < 0.1] = IGNORE
    copied = (rng.random(shape) < 0.6) & (references < 4)
    predictions = np.where(copied, references, rng.choice([0, 1, 2, 3, 5], size=shape))
    return predictions, references


def test_matches_numpy_with_ignored_pixels_and_absent_classes():
    predictions, references = random_maps(np.random.default_rng(0), (3, 40, 50))
    metric = SegmentationMetric(num_labels=7, ignore_index=IGNORE)
    metric.update(torch.from_numpy(predictions), torch.from_numpy(references))
    result = metric.compute()

    assert_metrics_equal(result, numpy_metrics(predictions, references, 7))
    iou, accuracy = result["per_category_iou"], result["per_category_accuracy"]
    assert math.isnan(iou[6]) and math.isnan(accuracy[6])  # absent everywhere: left out of both means
    assert iou[5] == 0.0 and math.isnan(accuracy[5])  # only predicted
    assert iou[4] == 0.0 and accuracy[4] == 0.0  # only in the references
    assert 0.3 < result["mean_iou"] < 0.7
    assert result["mean_iou"] == pytest.approx(np.mean(iou[:6]))
    json.loads(json.dumps(result))  # plain Python values


def test_several_updates_equal_one_big_update():
    rng = np.random.default_rng(1)
    maps = [random_maps(rng, shape) for shape in [(2, 17, 23), (1, 31, 8), (4, 9, 9)]]
    streamed = SegmentationMetric(7, ignore_index=IGNORE)
    for predictions, references in maps:  # numpy input, uint8 references
        streamed.update(predictions, references.astype(np.uint8))
    all_predictions = np.concatenate([p.ravel() for p, _ in maps])
    all_references = np.concatenate([r.ravel() for _, r in maps])
    at_once = SegmentationMetric(7, ignore_index=IGNORE)
    at_once.update(torch.from_numpy(all_predictions), torch.from_numpy(all_references))

    assert torch.equal(streamed.confusion_matrix, at_once.confusion_matrix)
    assert streamed.confusion_matrix.sum() == np.sum(all_references != IGNORE)
    assert_metrics_equal(streamed.compute(), numpy_metrics(all_predictions, all_references, 7))
    streamed.reset()
    assert streamed.confusion_matrix.sum() == 0 and math.isnan(streamed.compute()["mean_iou"])


def test_matches_evaluate_documented_example():
    """The example in evaluate's `mean_iou` docstring (maps of different sizes, prediction 255 at ignored pixels)."""
    predictions = [
        np.array([[1, 2], [3, 4], [5, 255]]),
        np.array([[2, 7], [9, 2], [3, 6]]),
        np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]]),
    ]
    references = [
        np.array([[0, 3], [5, 4], [6, 255]]),
        np.array([[1, 7], [9, 2], [3, 6]]),
        np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]]),
    ]
    metric = SegmentationMetric(num_labels=10, ignore_index=255)
    for prediction, reference in zip(predictions, references):
        metric.update(prediction, reference)
    result = metric.compute()

    assert result["mean_iou"] == pytest.approx(0.4775)
    assert result["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842)
    np.testing.assert_allclose(result["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])


def test_trainer_callable_upsamples_accumulates_and_resets():
    num_labels, label_size = 4, (24, 20)
    generator = torch.Generator().manual_seed(0)
    compute_metrics = compute_metrics_for_trainer(num_labels, ignore_index=IGNORE)
    batches = []
    for batch_size in (2, 3, 1):
        logits = torch.randn(batch_size, num_labels, 6, 5, generator=generator)
        labels = torch.randint(0, num_labels, (batch_size, *label_size), generator=generator)
        labels[:, :3] = IGNORE
        labels[:, -2:] = -100  # Trainer's padding across processes
        batches.append((logits, labels))
    upsampled = [functional.interpolate(lg, size=label_size, mode="bilinear", align_corners=False) for lg, _ in batches]
    expected_predictions = torch.cat(upsampled).argmax(1).numpy()
    all_labels = torch.cat([labels for _, labels in batches])
    expected = numpy_metrics(expected_predictions, all_labels.masked_fill(all_labels == -100, IGNORE).numpy(), 4)

    for _ in range(2):  # a second evaluation starts from zero
        outputs = [
            compute_metrics(EvalPrediction(predictions=(logits, logits[:, :1]), label_ids=labels), compute_result=last)
            for (logits, labels), last in zip(batches, (False, False, True))
        ]
        assert outputs[:2] == [None, None]
        assert_metrics_equal(outputs[2], expected)
    assert 0.05 < outputs[2]["mean_iou"] < 0.6  # random logits: IoU well below 1 yet above 0


def test_trainer_callable_accepts_numpy_logits():
    logits = np.random.default_rng(2).normal(size=(2, 3, 8, 8)).astype(np.float32)
    labels = logits.argmax(1)
    result = compute_metrics_for_trainer(3)(EvalPrediction(predictions=logits, label_ids=labels), compute_result=True)
    assert result["overall_accuracy"] == 1.0 and result["mean_iou"] == 1.0


@pytest.mark.parametrize(
    ("predictions", "references", "error", "message"),
    [
        (np.zeros((2, 3)), np.zeros((2, 3), int), TypeError, "predictions must be integer class ids"),
        (np.zeros((2, 3), int), np.zeros((3, 2), int), ValueError, r"same shape, got \(2, 3\) and \(3, 2\)"),
        (np.zeros(4, int), np.array([0, 7, 255, -1]), ValueError, r"references must be .*found -1, 7"),
        (np.array([0, 5, 2, 9]), np.array([0, 1, 1, 255]), ValueError, r"predictions at non-ignored pixels .*found 5$"),
    ],
)
def test_update_rejects_bad_input(predictions, references, error, message):
    metric = SegmentationMetric(num_labels=5)
    with pytest.raises(error, match=message):
        metric.update(predictions, references)
    assert metric.confusion_matrix.sum() == 0


def test_constructor_and_trainer_callable_errors():
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMetric(num_labels=5, ignore_index=3)
    compute_metrics = compute_metrics_for_trainer(3)
    eval_pred = EvalPrediction(predictions=torch.zeros(2, 4, 4, 4), label_ids=torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="logits have 4 classes, expected num_labels=3"):
        compute_metrics(eval_pred, compute_result=True)
    with pytest.raises(TypeError, match="batch_eval_metrics=True"):
        compute_metrics(eval_pred)


def test_compute_across_processes_sums_the_other_processes_matrices(monkeypatch):
    """A real one-process gloo group whose all_reduce also adds the matrix a second process would contribute."""
    predictions, references = random_maps(np.random.default_rng(3), (2, 16, 16))
    other_process = SegmentationMetric(7, ignore_index=IGNORE)
    other_process.update(predictions[1], references[1])
    all_reduce = torch.distributed.all_reduce

    def all_reduce_with_other_process(tensor):
        all_reduce(tensor)
        tensor += other_process.confusion_matrix

    metric = SegmentationMetric(7, ignore_index=IGNORE)
    metric.update(predictions[0], references[0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_with_other_process)
        summed = metric.compute(across_processes=True)
        local = metric.compute()
    finally:
        torch.distributed.destroy_process_group()
    assert_metrics_equal(summed, numpy_metrics(predictions, references, 7))
    assert_metrics_equal(local, numpy_metrics(predictions[0], references[0], 7))  # the local matrix is unchanged
