"""The built-in synthetic demo dataset: deterministic, distinct splits, every class present, consistent sizes."""

import itertools

import datasets
import numpy as np
import pytest

from semask.demo_data import DEMO_LABELS, load_demo_dataset

SMALL = {"num_train": 6, "num_validation": 5, "image_size": 48}


def encoded_images(dataset: datasets.Dataset, column: str) -> list[bytes]:
    """The stored PNG bytes of a column."""
    return [row["bytes"] for row in dataset.cast_column(column, datasets.Image(decode=False))[column]]


@pytest.fixture(scope="module")
def demo() -> datasets.DatasetDict:
    return load_demo_dataset(**SMALL, seed=0)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(demo):
    again = load_demo_dataset(**SMALL, seed=0)
    other_seed = load_demo_dataset(**SMALL, seed=1)
    for split, column in itertools.product(("train", "validation"), ("image", "label")):
        assert encoded_images(again[split], column) == encoded_images(demo[split], column)
        assert not set(encoded_images(other_seed[split], column)) & set(encoded_images(demo[split], column))


def test_splits_differ_and_larger_splits_extend_smaller_ones(demo):
    assert list(demo) == ["train", "validation"]
    assert not set(encoded_images(demo["train"], "image")) & set(encoded_images(demo["validation"], "image"))
    larger = load_demo_dataset(num_train=8, num_validation=1, image_size=48)
    assert encoded_images(larger["train"], "image")[:6] == encoded_images(demo["train"], "image")


def test_images_and_labels_match_in_size_and_cover_every_class(demo):
    for split in ("train", "validation"):
        seen = set()
        for example in demo[split]:
            assert example["image"].mode == "RGB" and example["label"].mode == "L"
            assert example["image"].size == example["label"].size == (48, 48)
            labels = np.asarray(example["label"])
            assert labels.min() >= 0 and labels.max() < len(DEMO_LABELS)
            seen |= set(np.unique(labels).tolist())
        assert seen == set(range(len(DEMO_LABELS))), split


def test_classes_look_different(demo):
    """Mean colours per class lie far apart, so the images really depend on the label maps."""
    images = np.concatenate([np.asarray(image).reshape(-1, 3) for image in demo["train"]["image"]]).astype(float)
    labels = np.concatenate([np.asarray(label).ravel() for label in demo["train"]["label"]])
    mean_colours = np.stack([images[labels == class_id].mean(0) for class_id in range(len(DEMO_LABELS))])
    distances = np.linalg.norm(mean_colours[:, None] - mean_colours[None], axis=-1)
    assert distances[~np.eye(len(DEMO_LABELS), dtype=bool)].min() > 40


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"num_validation": 0}, "num_validation must be at least 1"), ({"image_size": 16}, "image_size must be at least")],
)
def test_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        load_demo_dataset(**{**SMALL, **arguments})
