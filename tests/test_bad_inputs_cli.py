"""Bad inputs to the command-line tools: one `error:` line and a non-zero exit, never a traceback or a wrong output."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import save_tiny_model
from test_conversion import assert_conversion_refused, save_checkpoint

from conftest import exif_rotated_jpeg, fpn_fixture_dir
from semask import SemaskForSemanticSegmentation, SemaskImageProcessor
from semask.cli import main as segment
from semask.conversion import load_original_state_dict
from semask.conversion import main as convert
from semask.inference import predict_probabilities

KINDS = ("labels", "overlay", "legend")
GOOD = ("a_good", "e_good")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-semask")


def run(*arguments) -> int:
    return segment([str(argument) for argument in arguments])


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_png_gives_the_label_map_of_the_api(model_dir, tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (30, 40), dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert run(path, "--model", model_dir, "-o", tmp_path / "out") == 0
    model = SemaskForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SemaskImageProcessor.from_pretrained(model_dir)
    expected = predict_probabilities(model, processor, Image.open(path)).argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "deep_labels.png")), expected)


def test_exif_rotated_jpeg_gives_the_label_map_of_the_api(model_dir, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_rotated_jpeg(path)
    assert run(path, "--model", model_dir, "-o", tmp_path / "out") == 0
    model = SemaskForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SemaskImageProcessor.from_pretrained(model_dir)
    expected = predict_probabilities(model, processor, Image.open(path)).argmax(0).numpy()
    assert expected.shape == (40, 30)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "rotated_labels.png")), expected)


def test_unreadable_images_are_reported_and_the_others_segmented(model_dir, tmp_path, capsys):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    for seed, stem in enumerate(GOOD):
        (images / f"{stem}.png").write_bytes(png_bytes(seed))
    bad = {"b_empty.png": b"", "c_truncated.png": png_bytes(2)[: len(png_bytes(2)) // 2], "d_text.png": b"hello\n"}
    for name, data in bad.items():
        (images / name).write_bytes(data)
    assert run(images, "--model", model_dir, "-o", output) == 1
    captured = capsys.readouterr()
    for name in bad:
        assert f"error: Cannot read image {images / name}: " in captured.err
        assert not list(output.glob(f"{name[:-4]}_*"))
    assert "error: 3 of 5 images could not be segmented: " in captured.err and "Segmented 2 image(s)" in captured.out
    segmented = {path: path.read_bytes() for path in output.iterdir()}
    assert sorted(path.name for path in segmented) == sorted(f"{stem}_{kind}.png" for stem in GOOD for kind in KINDS)

    # a rerun skips the images already segmented and redoes only the others, once they are readable
    for seed, name in enumerate(bad):
        (images / name).write_bytes(png_bytes(seed))
    assert run(images, "--model", model_dir, "-o", output) == 0
    out = capsys.readouterr().out
    assert "skipping 2 image(s) already segmented; pass --overwrite to redo them" in out
    assert "Segmented 3 image(s)" in out
    assert all(path.read_bytes() == data for path, data in segmented.items())
    assert len(list(output.iterdir())) == 5 * len(KINDS)


def test_image_the_processor_refuses_is_reported_and_the_others_segmented(model_dir, tmp_path, capsys):
    images, output = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    (images / "a_good.png").write_bytes(png_bytes(0))
    Image.fromarray(np.zeros((2, 9000, 3), np.uint8)).save(images / "b_thin.png")
    assert run(images, "--model", model_dir, "-o", output) == 1
    captured = capsys.readouterr()
    assert "error: Resizing 2x9000 (HxW) to fit " in captured.err, captured.err
    assert f"({images / 'b_thin.png'})" in captured.err and "1 of 2 images could not be segmented" in captured.err
    assert sorted(path.name for path in output.iterdir()) == sorted(f"a_good_{kind}.png" for kind in KINDS)


def test_no_outputs_of_an_image_whose_outputs_failed(model_dir, tmp_path, monkeypatch):
    (tmp_path / "photo.png").write_bytes(png_bytes(0))

    def fail(*arguments):
        raise RuntimeError("out of memory")

    monkeypatch.setattr("semask.cli.priors_image", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(tmp_path / "photo.png", "--model", model_dir, "-o", tmp_path / "out", "--save-priors")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_config_that_disagrees_with_the_weights(model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for file in model_dir.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    config = json.loads((model / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "a", "1": "b", "2": "c"}, {"a": 0, "b": 1, "c": 2}
    (model / "config.json").write_text(json.dumps(config))
    (tmp_path / "photo.png").write_bytes(png_bytes(0))
    assert run(tmp_path / "photo.png", "--model", model, "-o", tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert f"error: Cannot load model {model}: " in error and "do not fit its config" in error
    assert "decode_head.classifier" in error and "num_labels (3)" in error


@pytest.mark.parametrize("where", ["existing file", "under a file", "read-only folder"])
def test_output_folder_that_cannot_be_made(model_dir, tmp_path, capsys, where):
    if where == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes to read-only folders")
    (tmp_path / "photo.png").write_bytes(png_bytes(0))
    (tmp_path / "file").write_text("a file")
    output = {"existing file": tmp_path / "file", "under a file": tmp_path / "file" / "out"}.get(where)
    if output is None:
        output = tmp_path / "locked"
        output.mkdir(mode=0o555)
    assert run(tmp_path / "photo.png", "--model", model_dir, "-o", output) == 1
    assert f"output folder {output}: " in capsys.readouterr().err


@pytest.fixture(scope="module")
def original_state_dict():
    return load_original_state_dict(fpn_fixture_dir("tiny-windowed") / "original_checkpoint.pth")


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_unreadable_checkpoint(original_state_dict, tmp_path, capsys, kind):
    checkpoint = tmp_path / "model.pth"
    if kind == "text":
        checkpoint.write_text("just some text, not a checkpoint\n")
    elif kind == "truncated":
        data = save_checkpoint(original_state_dict, checkpoint).read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    else:
        checkpoint.write_bytes(b"")
    assert_conversion_refused(checkpoint, capsys, f"error: Cannot read checkpoint {checkpoint}: not a PyTorch")


def test_pickled_code_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"echo pwned > {marker}",)

    (tmp_path / "checkpoint").mkdir()
    checkpoint = tmp_path / "checkpoint" / "model.pth"
    torch.save({"state_dict": {"backbone.x": torch.zeros(1)}, "meta": Payload()}, checkpoint)
    assert_conversion_refused(checkpoint, capsys, f"Cannot read checkpoint {checkpoint}: it holds pickled objects")
    assert not marker.exists()


def test_non_finite_weights_are_refused(original_state_dict, tmp_path, capsys):
    state_dict = dict(original_state_dict)
    key = "backbone.layers.0.blocks.0.mlp.fc1.weight"
    state_dict[key] = state_dict[key].clone()
    state_dict[key][0, 0] = float("nan")
    checkpoint = save_checkpoint(state_dict, tmp_path / "nan.pth")
    assert_conversion_refused(checkpoint, capsys, f"NaN or infinite weights in 1 tensor(s): {key}")


def test_unknown_semantic_attention_kind(original_state_dict, tmp_path, capsys):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    output = tmp_path / "out"
    arguments = ["--checkpoint", str(checkpoint), "--output", str(output)]
    assert convert([*arguments, "--semantic-attention", "windowed,bogus,global,global"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: invalid model settings: ") and "['bogus']" in error
    assert len(error.strip().splitlines()) == 1 and not output.exists()


def test_malformed_labels_file_is_named(original_state_dict, tmp_path, capsys):
    checkpoint = save_checkpoint(original_state_dict, tmp_path / "ok.pth")
    labels = tmp_path / "labels.json"
    labels.write_text('["sky", "road",')
    assert convert(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--labels", str(labels)]) == 1
    assert f"error: Cannot read the labels file {labels}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
