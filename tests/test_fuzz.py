"""Property-based fuzzing (hypothesis) of the image processor and the metrics.

Random sizes, dtypes, channel layouts, containers, value ranges and settings: the processor gives float32 pixels
at the size mmcv's rule predicts (written out again here), finite for finite input, or exactly the documented
error that the input calls for; the metrics equal the numpy reference of `test_metrics`, and a refused update
leaves them unchanged.

Bounded for CI by the "semask-ci" profile (derandomized, no example database, a few seconds per test); set
SEMASK_HYPOTHESIS_PROFILE=semask-thorough for a longer, random search.
"""

import os
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_metrics import assert_metrics_equal, numpy_metrics

from semask import SemaskImageProcessor
from semask.metrics import SegmentationMetric

settings.register_profile(
    "semask-ci",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("semask-thorough", max_examples=2000, deadline=None, database=None)
FUZZ = settings.get_profile(os.environ.get("SEMASK_HYPOTHESIS_PROFILE", "semask-ci"))

IMAGE_DTYPES = (np.uint8, np.uint8, np.uint16, np.float16, np.float32, np.float32, np.float64, np.int32, np.bool_)
# The processor's documented refusals (ValueError), by the first words of their messages.
CHANNELS = "Images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels"
EMPTY = "Empty image"
NON_FINITE = "The image has"
DTYPE = "Unsupported image dtype"
RESIZE = "Resizing"


def mmcv_rescale_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """mmcv's `rescale_size` (keep ratio), as written in mmcv 1.x: scale factor, then `int(side * factor + 0.5)`."""
    factor = min(
        max(shortest_edge, longest_edge) / max(height, width), min(shortest_edge, longest_edge) / min(height, width)
    )
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


@st.composite
def image_cases(draw) -> dict:
    layout = draw(st.sampled_from(["hw", "hwc", "chw"]))
    channels = 1 if layout == "hw" else draw(st.sampled_from([1, 3, 3, 3, 4, 2, 5]))
    side = st.one_of(st.integers(0, 40), st.sampled_from([1, 2, 3, 4, 700]))
    height, width = draw(side), draw(side)
    dtype = np.dtype(draw(st.sampled_from(IMAGE_DTYPES)))
    shape = {"hw": (height, width), "hwc": (height, width, channels), "chw": (channels, height, width)}[layout]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        low, high = draw(st.sampled_from([(0.0, 1.0), (0.0, 255.0), (-300.0, 300.0), (0.0, 1e6)]))
        with np.errstate(over="ignore"):  # float16 overflows to inf above 65504: a non-finite image too
            image = rng.uniform(low, high, shape).astype(dtype)
        if image.size and (special := draw(st.sampled_from([None] * 5 + [np.nan, np.inf, -np.inf]))) is not None:
            image.flat[draw(st.integers(0, image.size - 1))] = special
    elif dtype.kind == "b":
        image = rng.integers(0, 2, shape).astype(bool)
    else:
        info = np.iinfo(dtype)
        image = rng.integers(max(info.min, -(2**20)), min(info.max, 2**20) + 1, shape, endpoint=False).astype(dtype)
    pil_ok = dtype == np.uint8 and layout != "chw" and channels in (1, 3, 4) and height and width
    container = draw(st.sampled_from(["numpy", "torch", "pil"] if pil_ok else ["numpy", "torch"]))
    if container == "torch" and dtype == np.uint16:
        container = "numpy"
    if draw(st.booleans()):
        short = draw(st.integers(1, 24))
        size = {"shortest_edge": short, "longest_edge": draw(st.integers(short, 64))}
    else:
        size = {"height": draw(st.integers(1, 32)), "width": draw(st.integers(1, 32))}
    kwargs = {
        "size": size,
        "do_resize": draw(st.booleans()),
        "resize_library": draw(st.sampled_from(["opencv", "pil"])),
        "do_rescale": draw(st.booleans()),
        "rescale_factor": draw(st.sampled_from([1 / 255, 255.0])),
        "size_divisor": draw(st.sampled_from([None, 1, 4, 7])),
    }
    return {"image": image, "layout": layout, "container": container, "kwargs": kwargs}


def as_container(image: np.ndarray, layout: str, container: str):
    if container == "torch":
        return torch.from_numpy(image)
    if container == "pil":
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return image


def expected_outcome(case: dict) -> tuple[str | None, tuple[int, int] | None]:
    """The documented error (its first words) or the output size (H, W) for a case, in the processor's check order."""
    image, layout, kwargs = case["image"], case["layout"], case["kwargs"]
    if layout == "chw":
        channels, height, width = image.shape
    else:
        height, width = image.shape[:2]
        channels = 1 if layout == "hw" else image.shape[2]
    if image.ndim == 3 and not {image.shape[0], image.shape[-1]} & {1, 3, 4}:
        return CHANNELS, None
    if 0 in (height, width):
        return EMPTY, None
    if channels not in (1, 3, 4):
        return CHANNELS, None
    colour = image[:3] if layout == "chw" else image[..., :3] if layout == "hwc" else image  # alpha is dropped
    if image.dtype.kind == "f" and not np.isfinite(colour).all():
        return NON_FINITE, None
    if image.dtype not in (np.uint8, np.uint16) and image.dtype.kind != "f":
        return DTYPE, None
    size = kwargs["size"]
    if not kwargs["do_resize"]:
        output = (height, width)
    elif "height" in size:
        output = (size["height"], size["width"])
    else:
        output = mmcv_rescale_size(height, width, size["shortest_edge"], size["longest_edge"])
        if min(output) < 1:
            return RESIZE, None
    if divisor := kwargs["size_divisor"]:
        output = tuple(-(-side // divisor) * divisor for side in output)
    return None, output


@FUZZ
@given(case=image_cases())
def test_processor_gives_the_mmcv_size_or_the_documented_error(case):
    error, output = expected_outcome(case)
    event(f"outcome: {error or 'processed'}")
    processor = SemaskImageProcessor(**case["kwargs"])
    image = as_container(case["image"], case["layout"], case["container"])
    fixed_format = case["layout"] != "hw" and case["container"] != "pil"  # 3-d arrays: say where the channels are
    input_data_format = {"hwc": "channels_last", "chw": "channels_first"}[case["layout"]] if fixed_format else None
    if error is not None:
        with pytest.raises(ValueError, match="^" + re.escape(error)):
            processor(image, input_data_format=input_data_format, return_tensors="pt")
        return
    pixel_values = processor(image, input_data_format=input_data_format, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, *output)
    assert pixel_values.dtype == torch.float32 and torch.isfinite(pixel_values).all()


METRIC_FAULTS = (None, None, None, "float predictions", "float references", "shape", "reference", "prediction")


@st.composite
def metric_updates(draw) -> tuple[int, list[tuple]]:
    """A label count and updates: (predictions, references, expected error type or None, message pattern)."""
    num_labels = draw(st.integers(1, 6))
    updates = []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
        dtype = np.dtype(draw(st.sampled_from([np.int64, np.int32, np.int16, np.uint8])))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        references = rng.choice([*range(num_labels), 255], shape).astype(dtype)
        predictions = rng.integers(0, num_labels, shape).astype(dtype)
        ignored, valid = np.flatnonzero(references == 255), np.flatnonzero(references != 255)
        if ignored.size and draw(st.booleans()):  # predictions at ignored pixels are not checked
            predictions.flat[draw(st.sampled_from(ignored.tolist()))] = num_labels
        fault = draw(st.sampled_from(METRIC_FAULTS))
        error, message = None, None
        if fault == "float predictions":
            predictions, error, message = predictions.astype(np.float32), TypeError, "predictions must be integer"
        elif fault == "float references":
            references, error, message = references.astype(np.float64), TypeError, "references must be integer"
        elif fault == "shape":
            predictions, error, message = np.append(predictions.ravel(), 0), ValueError, "same shape"
        elif fault == "reference" and references.size:
            bad = draw(st.sampled_from([num_labels, 254] + ([-1] if dtype.kind == "i" else [])))
            references.flat[draw(st.integers(0, references.size - 1))] = bad
            error, message = ValueError, rf"references must be class ids in \[0, {num_labels}\)"
        elif fault == "prediction" and valid.size:
            predictions.flat[draw(st.sampled_from(valid.tolist()))] = num_labels
            error, message = ValueError, "predictions at non-ignored pixels must be class ids"
        if draw(st.booleans()):
            predictions, references = torch.from_numpy(predictions), torch.from_numpy(references)
        updates.append((predictions, references, error, message))
    return num_labels, updates


@FUZZ
@given(case=metric_updates())
def test_metrics_equal_the_numpy_reference_and_refused_updates_change_nothing(case):
    num_labels, updates = case
    metric = SegmentationMetric(num_labels)
    accepted = []
    for predictions, references, error, message in updates:
        event(f"update: {error.__name__ if error else 'accepted'}")
        before = metric.confusion_matrix.clone()
        if error is None:
            metric.update(predictions, references)
            accepted.append((np.asarray(predictions).ravel(), np.asarray(references).ravel()))
            continue
        with pytest.raises(error, match=message):
            metric.update(predictions, references)
        assert torch.equal(metric.confusion_matrix, before)
    predictions = np.concatenate([p for p, _ in accepted] or [np.zeros(0, int)]).astype(np.int64)
    references = np.concatenate([r for _, r in accepted] or [np.zeros(0, int)]).astype(np.int64)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN means of classes that never occur
        expected = numpy_metrics(predictions, references, num_labels)
    assert_metrics_equal(metric.compute(), expected)
