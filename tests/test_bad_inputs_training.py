"""Bad training inputs: 16-bit images, files that only fail when decoded, JPEG label maps, gapped label ids and how
the training script reports unusable data."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_bad_inputs_cli import error_line
from test_bad_inputs_processor import decompression_bomb_png
from test_data import make_folder_dataset, write_pair

from conftest import load_script
from semask.data import (
    DatasetArguments,
    DatasetValidationError,
    load_segmentation_data,
    undecoded,
    validate_segmentation_data,
)
from semask.image_processing_semask import SemaskImageProcessor
from semask.label_files import LabelsFileError, read_labels_file
from semask.training import EvalTransform, RecipeArguments, TrainTransform, normalization_constants

SIXTEEN_BIT_VALUE = 30000  # round(30000 * 255 / 65535) = 117; convert("RGB") clips it to 255


def sixteen_bit_pair(size=(8, 8)) -> dict[str, list]:
    image = Image.fromarray(np.full(size, SIXTEEN_BIT_VALUE, np.uint16))
    assert image.mode.startswith("I;16")
    return {"image": [image], "label": [Image.fromarray(np.ones(size, np.uint8))]}


def test_16_bit_image_eval_transform_matches_processor():
    processor = SemaskImageProcessor(size={"longest_edge": 32, "shortest_edge": 8})
    batch = sixteen_bit_pair()
    expected = processor(batch["image"][0], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(EvalTransform(processor)(batch)["pixel_values"][0], expected)


def test_16_bit_image_train_transform_is_not_saturated():
    processor = SemaskImageProcessor()
    recipe = RecipeArguments(
        crop_size=[8], random_rescale=False, cat_max_ratio=1.0, flip_probability=0.0, photometric_distortion=False
    )
    pixel_values = TrainTransform(processor, recipe)(sixteen_bit_pair())["pixel_values"][0]
    mean, std = normalization_constants(processor)
    expected = (117 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(pixel_values[:, 0, 0], expected)


def test_truncated_image_outside_checked_sample_is_named(tmp_path):
    root = make_folder_dataset(tmp_path / "data", splits=(("train", 6), ("val", 1)))
    (root / "id2label.json").write_text(json.dumps(["sky", "road", "car"]))
    checked = set(np.random.default_rng(0).choice(6, 2, replace=False).tolist())  # validation's sample (seed 0)
    index = min(set(range(6)) - checked)
    (root / "images" / "train" / f"train_{index}.jpg").unlink()
    path = root / "images" / "train" / f"train_{index}.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root)))
    validate_segmentation_data(data, label_check_samples=2, seed=0)  # headers are fine; the sample misses it
    transform = TrainTransform(SemaskImageProcessor(), RecipeArguments(crop_size=[16]))
    dataset = undecoded(data.dataset["train"]).with_transform(transform)
    with pytest.raises(DatasetValidationError, match=rf"Cannot decode {path}: .*truncated"):
        [dataset[i] for i in range(len(dataset))]
    with pytest.raises(DatasetValidationError, match=rf"Cannot decode {path}"):
        undecoded(data.dataset["train"]).with_transform(EvalTransform(SemaskImageProcessor()))[index]


def test_jpeg_label_maps_warn(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "data")
    (root / "id2label.json").write_text(json.dumps(["sky", "road", "car"]))
    label = root / "labels" / "train" / "train_1.png"
    Image.open(label).save(label.with_suffix(".jpg"))
    label.unlink()
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root)))
    with caplog.at_level(logging.WARNING, logger="semask.data"):
        validate_segmentation_data(data, label_check_samples=0)
    assert "1 train label maps are JPEG files" in caplog.text and "train_1.jpg" in caplog.text
    assert "alters class ids" in caplog.text and "PNG" in caplog.text


def test_gapped_label_ids_name_file_and_missing_ids(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"0": "a", "2": "b", "3": "c"}))
    with pytest.raises(LabelsFileError, match=rf"{path} must use the ids 0\.\.2, .*missing ids: \[1\]"):
        read_labels_file(path)
    path.write_text(json.dumps({"0": "a", "00": "b"}))
    with pytest.raises(LabelsFileError, match=r"got \[0\] \(missing ids: \[1\]\)"):  # "0" and "00" repeat 0
        read_labels_file(path)


def test_script_reports_dataset_error_without_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    script = load_script("train_semask")
    argv = ["--dataset_name", str(tmp_path / "empty"), "--preset", "tiny", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'empty'} is not a dataset folder") and "Traceback" not in error
    assert error.count("\n") == 1


def test_label_values_outside_the_label_set_are_named_when_training_reaches_them(tmp_path):
    root = make_folder_dataset(tmp_path / "data", splits=(("train", 4), ("val", 1)))
    (root / "id2label.json").write_text(json.dumps(["sky", "road", "car"]))
    bad = write_pair(root / "images" / "train", root / "labels" / "train", "train_9", values=(0, 2, 7))
    data = load_segmentation_data(DatasetArguments(dataset_name=str(root)))
    validate_segmentation_data(data, label_check_samples=0)  # the pixel values of no label map were checked
    processor = SemaskImageProcessor(do_reduce_labels=False)
    for transform in (
        TrainTransform(processor, RecipeArguments(crop_size=[8]), num_labels=3),
        EvalTransform(processor, num_labels=3),
    ):
        dataset = undecoded(data.dataset["train"]).with_transform(transform)
        with pytest.raises(DatasetValidationError, match=rf"{bad} has values outside the 3 labels .*: 7\."):
            [dataset[index] for index in range(len(dataset))]


def test_colour_label_map_given_to_the_transforms_is_refused():
    batch = {"image": [Image.new("RGB", (8, 8))], "label": [Image.new("RGB", (8, 8), (1, 2, 3))]}
    recipe = RecipeArguments(crop_size=[8])
    for transform in (TrainTransform(SemaskImageProcessor(), recipe), EvalTransform(SemaskImageProcessor())):
        with pytest.raises(DatasetValidationError, match=r"a \w+ label map has shape \(8, 8, 3\): label maps must be"):
            transform(batch)


def spoil_dataset(root, how: str):
    """Damage a dataset folder from `make_folder_dataset` in one way; returns the file or folder concerned."""
    train_images, train_labels = root / "images" / "train", root / "labels" / "train"
    if how == "empty image folder":
        for path in train_images.iterdir():
            path.unlink()
        return train_images
    if how == "two images share a name":
        Image.new("RGB", (16, 12)).save(train_images / "train_0.png")
        return train_images / "train_0.png"
    if how == "0-byte label map":
        (train_labels / "train_1.png").write_bytes(b"")
        return train_labels / "train_1.png"
    if how == "mode F image":
        (train_images / "train_1.jpg").unlink()
        Image.new("F", (16, 12), 0.5).save(train_images / "train_1.tif")
        return train_images / "train_1.tif"
    if how == "mode I label map beyond 16 bits":
        (train_labels / "train_1.png").unlink()
        Image.new("I", (16, 12), 70000).save(train_labels / "train_1.tif")
        return train_labels / "train_1.tif"
    if how == "decompression bomb":
        (train_images / "train_1.jpg").unlink()
        return decompression_bomb_png(train_images / "train_1.png")
    raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("empty image folder", "No image files (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) in {path}"),
        ("two images share a name", "Two files share the name 'train_0' in"),
        ("0-byte label map", "Cannot read {image} or {path}: cannot identify image file"),
        ("mode F image", "{path} is a 32-bit float image (mode F), whose pixel scale is unknown"),
        (
            "mode I label map beyond 16 bits",
            "Cannot read {image} or {path}: A 32-bit integer image (mode I) with values",
        ),
        ("decompression bomb", "Cannot read {path} or {label}: Image size (900000000 pixels) exceeds limit"),
    ],
)
def test_dataset_folders_that_cannot_be_used_are_named(tmp_path, how, message):
    root = make_folder_dataset(tmp_path / "data")
    (root / "id2label.json").write_text(json.dumps(["sky", "road", "car"]))
    path = spoil_dataset(root, how)
    image = root / "images" / "train" / "train_1.jpg"
    label = root / "labels" / "train" / "train_1.png"
    expected = re.escape(message.format(path=path, image=image, label=label))
    with pytest.raises(DatasetValidationError, match=expected):
        validate_segmentation_data(load_segmentation_data(DatasetArguments(dataset_name=str(root))), -1)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output_dir", "{tmp}/file"], "Cannot create --output_dir {tmp}/file: File exists"),
        (["--output_dir", "{tmp}/file/run"], "Cannot create --output_dir {tmp}/file/run: Not a directory"),
        (["--output_dir", "{tmp}/run", "--fp16", "True", "--use_cpu", "True"], "--fp16 on the CPU: accelerate"),
        (["--output_dir", "{tmp}/run", "--resume_from_checkpoint", "True"], "--resume_from_checkpoint True: no"),
        (
            ["--output_dir", "{tmp}/run", "--resume_from_checkpoint", "{tmp}/no"],
            "Cannot resume from {tmp}/no: {tmp}/no",
        ),
    ],
    ids=["output is a file", "output under a file", "fp16 on the cpu", "nothing to resume", "missing checkpoint"],
)
def test_training_script_refuses_unusable_options_before_reading_data(
    tmp_path, capsys, monkeypatch, arguments, message
):
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr("semask.data.load_segmentation_data", None)  # the script would fail reading the data
    argv = ["--dataset_name", "demo", *(argument.format(tmp=tmp_path) for argument in arguments)]
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_semask").main(argv)
    if isinstance(exit_info.value.code, str):  # SystemExit(message): Python prints it and exits 1
        output = exit_info.value.code
    else:  # unusable data or checkpoints: "error: <message>" on stderr, exit 2
        assert exit_info.value.code == 2
        output = error_line(capsys.readouterr().err).removeprefix("error: ")
    assert output.startswith(message.format(tmp=tmp_path)), output
    assert (tmp_path / "file").read_text() == "mine"
