"""Bad training inputs: 16-bit images, files that only fail when decoded, JPEG label maps, gapped label ids and how
the training script reports unusable data."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import make_folder_dataset

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
