"""`evaluate.load(EVALUATE_MEAN_IOU)`: the Hub `mean_iou` interface on semask's streaming confusion matrix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from semask.metrics import EVALUATE_MEAN_IOU, SegmentationMetric

NUM_LABELS = 9  # references use 0-6, predictions 0-7: class 7 is only predicted, class 8 is absent everywhere
METRIC_NAMES = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
SETTINGS = {
    "plain": {"ignore_index": 255},
    "reduce_labels": {"ignore_index": 255, "reduce_labels": True},
    "label_map": {"ignore_index": 255, "label_map": {3: 5, 5: 3, 6: 255}},  # a swap: each entry reads the original
    "label_map_then_reduce": {"ignore_index": 255, "label_map": {1: 0, 6: 2}, "reduce_labels": True},
    "negative_ignore_index": {"ignore_index": -1},
}


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """evaluate copies the module into `HF_MODULES_CACHE` and writes its metadata to the copy's path cut at the first
    ".py" (evaluate 0.4.6), which the test HF_HOME (`.pytest_cache/...`) has: this cache's path has none."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path_factory.mktemp("hf_modules"))
        yield


@pytest.fixture
def mean_iou():
    return evaluate.load(EVALUATE_MEAN_IOU)


def mapped_labels(labels, label_map: dict | None = None, reduce_labels: bool = False) -> np.ndarray:
    """`label_map` (every entry reads the original labels), then the reduction: 0 and 255 -> 255, k -> k - 1."""
    labels = np.asarray(labels).astype(np.int64)
    mapped = labels.copy()
    for old, new in (label_map or {}).items():
        mapped[labels == old] = new
    return np.where((mapped == 0) | (mapped == 255), 255, mapped - 1) if reduce_labels else mapped


def numpy_mean_iou(predictions, references, num_labels, ignore_index, label_map=None, reduce_labels=False) -> dict:
    """The metrics image by image and class by class with boolean masks, summed over the set (mmseg's definition)."""
    intersection, predicted, reference = np.zeros(num_labels), np.zeros(num_labels), np.zeros(num_labels)
    for prediction, labels in zip(predictions, references):
        prediction, labels = np.asarray(prediction), mapped_labels(labels, label_map, reduce_labels)
        valid = labels != ignore_index
        for index in range(num_labels):
            is_predicted, is_reference = valid & (prediction == index), valid & (labels == index)
            intersection[index] += np.sum(is_predicted & is_reference)
            predicted[index] += np.sum(is_predicted)
            reference[index] += np.sum(is_reference)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = intersection / (predicted + reference - intersection)
        accuracy = intersection / reference
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(accuracy),
        "overall_accuracy": intersection.sum() / reference.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def assert_results_close(actual: dict, expected: dict) -> None:
    assert list(actual) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-9, equal_nan=True, err_msg=name)


def random_label_maps(rng: np.random.Generator, count: int, ignore_index: int = 255) -> tuple[list, list]:
    """`count` maps of different sizes: references 0-6 with ~10% `ignore_index` (uint8 unless negative), predictions
    copying ~60% of them, the others drawn from 0, 1, 2, 5, 7."""
    predictions, references = [], []
    for _ in range(count):
        shape = tuple(rng.integers(3, 20, size=2))
        reference = rng.integers(0, 7, size=shape)
        reference[rng.random(shape) < 0.1] = ignore_index
        copied = np.clip(reference, 0, 6)
        predictions.append(np.where(rng.random(shape) < 0.6, copied, rng.choice([0, 1, 2, 5, 7], size=shape)))
        references.append(reference.astype(np.uint8) if ignore_index >= 0 else reference)
    return predictions, references


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_equals_numpy_and_segmentation_metric(mean_iou, name):
    options = SETTINGS[name]
    predictions, references = random_label_maps(np.random.default_rng(len(name)), 5, options["ignore_index"])
    results = mean_iou.compute(predictions=predictions, references=references, num_labels=NUM_LABELS, **options)

    assert_results_close(results, numpy_mean_iou(predictions, references, NUM_LABELS, **options))
    metric = SegmentationMetric(NUM_LABELS, options["ignore_index"])  # semask's metric on references mapped before
    for prediction, reference in zip(predictions, references):
        metric.update(prediction, mapped_labels(reference, options.get("label_map"), options.get("reduce_labels")))
    assert_results_close(results, metric.compute())
    assert isinstance(results["mean_iou"], np.float64) and results["per_category_iou"].shape == (NUM_LABELS,)
    assert results["per_category_iou"][7] == 0.0 and np.isnan(results["per_category_accuracy"][7])  # only predicted
    assert np.isnan(results["per_category_iou"][8]) and np.isnan(results["per_category_accuracy"][8])  # absent


def test_segmentation_metric_adds_label_pair_counts():
    """The hook the module folds its counts through: `update(..., counts=...)` equals the pixels themselves."""
    predictions, references = np.array([0, 1, 1, 2, 4]), np.array([0, 1, 2, 255, 2])
    counts = np.array([3, 0, 2, 9, 1])
    counted = SegmentationMetric(5)
    counted.update(predictions, references, counts=counts)
    repeated = SegmentationMetric(5)
    repeated.update(np.repeat(predictions, counts), np.repeat(references, counts))
    assert torch.equal(counted.confusion_matrix, repeated.confusion_matrix)
    assert counted.confusion_matrix.sum() == 6 and counted.confusion_matrix[2, 1] == 2
    with pytest.raises(ValueError, match=r"predictions, references and counts must have the same shape, got \(5,\)"):
        counted.update(predictions, references, counts=counts[:4])
    with pytest.raises(ValueError, match="counts must be non-negative numbers of pixels"):
        counted.update(predictions, references, counts=-counts)
    with pytest.raises(TypeError, match="counts must be integer class ids"):
        counted.update(predictions, references, counts=counts / 2)


def test_label_map_and_reduction_reach_the_right_classes(mean_iou):
    """A hand-checked case: 9 -> 2, then the reduction (0 ignored, k -> k - 1) makes every counted pixel correct."""
    references = [np.array([[0, 1, 9], [3, 255, 9]])]
    predictions = [np.array([[4, 0, 1], [2, 4, 1]])]  # 4 only at ignored pixels, which are not checked
    reduced = mean_iou.compute(
        predictions=predictions,
        references=references,
        num_labels=3,
        ignore_index=255,
        label_map={9: 2},
        reduce_labels=True,
    )
    np.testing.assert_array_equal(reduced["per_category_iou"], [1.0, 1.0, 1.0])
    assert reduced["overall_accuracy"] == 1.0
    plain = mean_iou.compute(
        predictions=predictions, references=references, num_labels=5, ignore_index=255, label_map={9: 1}
    )
    np.testing.assert_allclose(plain["per_category_iou"], [0, 2 / 3, 0, 0, 0])
    np.testing.assert_allclose(plain["per_category_accuracy"], [0, 2 / 3, np.nan, 0, np.nan], equal_nan=True)


def test_the_hub_metric_documented_example(mean_iou):
    """The example of the Hub `mean_iou` card, with its printed results (predictions 255 at ignored pixels)."""
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
    results = mean_iou.compute(predictions=predictions, references=references, num_labels=10, ignore_index=255)
    assert results["mean_iou"] == pytest.approx(0.4775, abs=1e-12)
    assert results["mean_accuracy"] == pytest.approx(0.5916666666666666, abs=1e-12)
    assert results["overall_accuracy"] == pytest.approx(0.5263157894736842, abs=1e-12)
    np.testing.assert_allclose(results["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1], atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_streaming_equals_one_compute(seed, sizes):
    predictions, references = random_label_maps(np.random.default_rng(seed), 6)
    options = SETTINGS["label_map_then_reduce"]
    metric = evaluate.load(EVALUATE_MEAN_IOU)
    at_once = metric.compute(predictions=predictions, references=references, num_labels=NUM_LABELS, **options)
    start = 0
    for size in [*sizes, len(predictions)]:  # the last batch takes what is left
        metric.add_batch(predictions=predictions[start : start + size], references=references[start : start + size])
        start += size
    streamed = metric.compute(num_labels=NUM_LABELS, **options)
    for name in METRIC_NAMES:
        np.testing.assert_array_equal(streamed[name], at_once[name], err_msg=name)  # exact: integer counts


def test_running_state_holds_counts_not_label_maps(mean_iou):
    batch = torch.from_numpy(np.random.default_rng(3).integers(0, NUM_LABELS, size=(4, 64, 64)))
    mean_iou.add_batch(predictions=batch, references=batch.flip(-1))  # one (batch, height, width) tensor
    mean_iou.add(prediction=Image.fromarray(batch[0].numpy().astype(np.uint8)), reference=batch[0].flip(-1).numpy())
    assert sum(mean_iou._pair_counts.values()) == 5 * 64 * 64 and len(mean_iou._pair_counts) <= NUM_LABELS**2
    assert mean_iou.writer is None and not list(Path(mean_iou.data_dir).glob("*.arrow"))  # no Arrow cache
    predictions, references = [*batch.numpy(), batch[0].numpy()], [*batch.flip(-1).numpy(), batch[0].flip(-1).numpy()]
    expected = numpy_mean_iou(predictions, references, NUM_LABELS, 255)
    assert_results_close(mean_iou.compute(num_labels=NUM_LABELS, ignore_index=255), expected)
    with pytest.raises(ValueError, match="no label maps to evaluate: call add_batch or add first"):
        mean_iou.compute(num_labels=NUM_LABELS, ignore_index=255)  # compute started afresh


def test_one_shot_compute_leaves_the_running_state(mean_iou):
    predictions, references = random_label_maps(np.random.default_rng(5), 3)
    mean_iou.add_batch(predictions=predictions[:1], references=references[:1])
    all_maps = mean_iou._compute(
        predictions=predictions, references=references, num_labels=NUM_LABELS, ignore_index=255
    )
    assert_results_close(all_maps, numpy_mean_iou(predictions, references, NUM_LABELS, 255))
    first = mean_iou.compute(num_labels=NUM_LABELS, ignore_index=255)
    assert_results_close(first, numpy_mean_iou(predictions[:1], references[:1], NUM_LABELS, 255))


def test_nan_to_num(mean_iou):
    results = mean_iou.compute(
        predictions=[np.array([[0, 1]])], references=[np.array([[0, 0]])], num_labels=3, ignore_index=255, nan_to_num=-1
    )
    np.testing.assert_array_equal(results["per_category_iou"], [0.5, 0.0, -1.0])
    np.testing.assert_array_equal(results["per_category_accuracy"], [0.5, -1.0, -1.0])
    assert results["mean_iou"] == 0.25 and results["mean_accuracy"] == 0.5  # the means leave NaN out first


@pytest.mark.parametrize(
    ("inputs", "options", "error", "message"),
    [
        ({"predictions": [np.zeros((2, 2))]}, {}, TypeError, "predictions must be integer class ids"),
        (
            {"predictions": [np.zeros((2, 3), int)]},
            {},
            ValueError,
            r"prediction 0 has shape \(2, 3\) but its reference",
        ),
        ({"predictions": [np.zeros((2, 2), int)] * 2}, {}, ValueError, "got 2 predictions but 1 references"),
        ({"references": None}, {}, ValueError, "pass both predictions and references, or neither"),
        (
            {"references": [np.full((2, 2), 3)]},
            {"num_labels": 3},
            ValueError,
            r"references must be class ids in \[0, 3\)",
        ),
        ({"predictions": [np.full((2, 2), 7)]}, {}, ValueError, r"predictions at non-ignored pixels .* found 7"),
        ({}, {"ignore_index": 0}, ValueError, r"ignore_index \(0\) must not be a class id"),
        ({}, {"reduce_labels": True, "ignore_index": -1}, ValueError, r"pass ignore_index=255 \(got -1\)"),
        ({}, {"label_map": {"1": 2}}, TypeError, "label_map must map integer labels to integer labels"),
    ],
)
def test_bad_input_leaves_the_running_counts(mean_iou, inputs, options, error, message):
    mean_iou.add_batch(predictions=[np.array([[0, 1]])], references=[np.array([[0, 0]])])
    arguments = {"predictions": [np.zeros((2, 2), int)], "references": [np.zeros((2, 2), int)], **inputs}
    with pytest.raises(error, match=message):
        mean_iou.compute(**arguments, **{"num_labels": 5, "ignore_index": 255, **options})
    results = mean_iou.compute(num_labels=3, ignore_index=255)  # only the batch added before
    np.testing.assert_allclose(results["per_category_iou"], [0.5, 0.0, np.nan], equal_nan=True)


def test_distributed_loading_is_refused():
    with pytest.raises(ValueError, match="load it with num_process=1"):
        evaluate.load(EVALUATE_MEAN_IOU, num_process=2, process_id=0)


def test_loads_offline_with_an_empty_hf_home(tmp_path):
    """A fresh process: no Hub access, nothing cached; the module is copied from the package into HF_HOME."""
    script = (
        "import evaluate, json, numpy as np; from semask.metrics import EVALUATE_MEAN_IOU\n"
        "metric = evaluate.load(EVALUATE_MEAN_IOU)\n"
        "metric.add_batch(predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [0, 255]])])\n"
        "results = metric.compute(num_labels=2, ignore_index=255)\n"
        "print(json.dumps({name: np.asarray(value).tolist() for name, value in results.items()}))\n"
    )
    hf_home = tmp_path / "hf_home"
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE"))}
    environment.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    completed = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {
        "mean_iou": 0.5,
        "mean_accuracy": 0.75,
        "overall_accuracy": pytest.approx(2 / 3, abs=1e-12),
        "per_category_iou": [0.5, 0.5],
        "per_category_accuracy": [0.5, 1.0],
    }
    assert list((hf_home / "modules" / "evaluate_modules" / "metrics" / "mean_iou").glob("*/mean_iou.py"))
