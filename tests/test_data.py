"""Dataset loading and the checks that run before training: clear errors that name the file."""

import json

import numpy as np
import pytest
from datasets import DatasetDict
from PIL import Image

from semask.data import (
    DatasetArguments,
    DatasetValidationError,
    load_segmentation_data,
    validate_segmentation_data,
)
from semask.label_files import read_labels_file
from semask.presets import ADE20K_LABELS

LABELS = ["sky", "road", "car"]


def write_pair(images_dir, labels_dir, name, size=(12, 16), label_size=None, values=(0, 1, 2), label_mode="L"):
    """An RGB image and a label map cycling through `values`; returns the label map's path."""
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    height, width = size
    Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(images_dir / f"{name}.jpg")
    label_height, label_width = label_size or size
    label = np.resize(np.array(values, np.uint8), label_height * label_width).reshape(label_height, label_width)
    path = labels_dir / f"{name}.png"
    Image.fromarray(label).convert(label_mode).save(path)
    return path


def make_folder_dataset(root, label_dir="labels", splits=(("train", 3), ("val", 2))):
    for split, count in splits:
        for index in range(count):
            write_pair(root / "images" / split, root / label_dir / split, f"{split}_{index}")
    return root


def load_and_validate(**kwargs):
    data = load_segmentation_data(DatasetArguments(**kwargs))
    validate_segmentation_data(data, label_check_samples=-1)
    return data


def test_images_labels_folder_loads_with_labels_file(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    (root / "id2label.json").write_text(json.dumps(LABELS))
    data = load_and_validate(dataset_name=str(root))
    assert isinstance(data.dataset, DatasetDict)
    assert {split: len(ds) for split, ds in data.dataset.items()} == {"train": 3, "validation": 2}
    assert data.dataset["train"].column_names == ["image", "label"]
    assert data.id2label == dict(enumerate(LABELS)) and data.reduce_labels is False
    assert np.asarray(data.dataset["validation"][1]["label"]).max() == 2


def test_ade_layout_implies_ade20k_labels_and_reduction(tmp_path):
    root = make_folder_dataset(tmp_path / "ADEChallengeData2016", "annotations", (("training", 2), ("validation", 1)))
    data = load_and_validate(dataset_name=str(root))
    assert data.id2label[0] == ADE20K_LABELS[0] and data.num_labels == 150
    assert data.reduce_labels is True and data.preset == "ade20k"


def test_separate_image_and_label_folders(tmp_path):
    for split in ("train", "validation"):
        write_pair(tmp_path / f"{split}_img", tmp_path / f"{split}_lbl", "a")
    labels_file = tmp_path / "labels.json"
    labels_file.write_text(json.dumps({"0": "x", "1": "y", "2": "z"}))
    data = load_and_validate(
        train_images_dir=str(tmp_path / "train_img"),
        train_labels_dir=str(tmp_path / "train_lbl"),
        validation_images_dir=str(tmp_path / "validation_img"),
        validation_labels_dir=str(tmp_path / "validation_lbl"),
        labels_file=str(labels_file),
    )
    assert data.id2label == {0: "x", 1: "y", 2: "z"}


def test_missing_validation_split_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "data", splits=(("train", 2),))
    with pytest.raises(DatasetValidationError, match=r"Missing validation split: expected .*images/validation"):
        load_segmentation_data(DatasetArguments(dataset_name=str(root), labels_file=None, dataset_preset="ade20k"))


def test_missing_split_in_saved_dataset(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    saved = load_segmentation_data(DatasetArguments(dataset_name=str(root), dataset_preset="cityscapes")).dataset
    DatasetDict({"train": saved["train"], "test": saved["validation"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DatasetValidationError, match=r"no 'validation' split \(found \['test', 'train'\]\)"):
        load_segmentation_data(DatasetArguments(dataset_name=str(tmp_path / "saved"), dataset_preset="cityscapes"))
    args = DatasetArguments(
        dataset_name=str(tmp_path / "saved"), validation_split="test", label_column="mask", dataset_preset="cityscapes"
    )
    with pytest.raises(DatasetValidationError, match="no 'mask' column"):
        load_segmentation_data(args)
    args.label_column = "label"
    assert len(load_segmentation_data(args).dataset["validation"]) == 2


def test_image_without_label(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    Image.new("RGB", (16, 12)).save(root / "images" / "train" / "lonely.jpg")
    with pytest.raises(DatasetValidationError, match=r"1 train images have no label map .*lonely\.jpg"):
        load_segmentation_data(DatasetArguments(dataset_name=str(root), dataset_preset="cityscapes"))


def test_size_mismatch_names_both_files(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    write_pair(root / "images" / "val", root / "labels" / "val", "odd", size=(12, 16), label_size=(12, 15))
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root), labels_file=None, dataset_preset="ade20k"))
    with pytest.raises(DatasetValidationError, match=r"labels/val/odd\.png is 12x15 \(HxW\) but its image .*odd\.jpg"):
        validate_segmentation_data(data, label_check_samples=0)  # sizes are checked on every file


def test_label_values_outside_label_set(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    (root / "id2label.json").write_text(json.dumps(LABELS))
    bad = write_pair(root / "images" / "train", root / "labels" / "train", "bad", values=(0, 2, 3, 7, 255))
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root)))
    with pytest.raises(DatasetValidationError, match=rf"{bad}.*outside the 3 labels .*: 3, 7\."):
        validate_segmentation_data(data, label_check_samples=-1)
    validate_segmentation_data(data, label_check_samples=0)  # pixel values are only checked on the sample
    # With reduced labels, 0 is ignored and 1..3 are the classes: only 7 is out of range.
    data.reduce_labels = True
    with pytest.raises(DatasetValidationError, match=r"with reduce_labels, 0 is ignored and 1\.\.3 .*: 7\."):
        validate_segmentation_data(data, label_check_samples=-1)


def test_unreadable_and_colour_files(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    (root / "images" / "train" / "train_0.jpg").write_bytes(b"not an image")
    write_pair(root / "images" / "val", root / "labels" / "val", "rgb", label_mode="RGB")
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root), dataset_preset="cityscapes"))
    with pytest.raises(DatasetValidationError) as error:
        validate_segmentation_data(data)
    message = str(error.value)
    assert "Cannot read" in message and "images/train/train_0.jpg" in message
    assert "labels/val/rgb.png has mode RGB: label maps must be single-channel class ids" in message


def test_demo_dataset_loads_and_validates():
    data = load_and_validate(dataset_name="demo", demo_train_size=5, demo_validation_size=5, demo_image_size=32)
    assert data.num_labels == 6 and not data.reduce_labels
    assert data.dataset["train"][0]["image"].size == (32, 32)


def test_labels_file_errors(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(ValueError, match=r"must use the ids 0\.\.1, got \[0, 2\]"):
        read_labels_file(path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="Cannot read the labels file"):
        read_labels_file(path)


def test_no_label_names(tmp_path):
    root = make_folder_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="No label names .* pass --labels_file"):
        load_segmentation_data(DatasetArguments(dataset_name=str(root)))
