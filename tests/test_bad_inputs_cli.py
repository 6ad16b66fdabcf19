"""Bad inputs to the command-line tools: one `error:` line and a non-zero exit, never a traceback or a wrong output."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from test_bad_inputs_processor import decompression_bomb_png
from test_cli import save_tiny_model
from test_conversion import assert_conversion_refused, save_checkpoint
from transformers import pipeline

from conftest import exif_rotated_jpeg, fpn_fixture_dir, load_script
from semask import SemaskForSemanticSegmentation, SemaskImageProcessor
from semask.cli import main as segment
from semask.conversion import load_original_state_dict
from semask.conversion import main as convert
from semask.data import undecoded
from semask.image_processing_semask import load_image
from semask.inference import predict_probabilities
from semask.training import EvalTransform
from semask.training.augmentation import decoded_pairs

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
    bad["d_bomb.png"] = decompression_bomb_png(images / "d_bomb.png").read_bytes()  # 30000 x 30000 pixels claimed
    assert run(images, "--model", model_dir, "-o", output) == 1
    captured = capsys.readouterr()
    for name in bad:
        assert f"error: Cannot read image {images / name}: " in captured.err
        assert not list(output.glob(f"{name[:-4]}_*"))
    assert "exceeds limit of 178956970 pixels" in captured.err and "Traceback" not in captured.err
    assert "error: 4 of 6 images could not be segmented: " in captured.err and "Segmented 2 image(s)" in captured.out
    segmented = {path: path.read_bytes() for path in output.iterdir()}
    assert sorted(path.name for path in segmented) == sorted(f"{stem}_{kind}.png" for stem in GOOD for kind in KINDS)

    # a rerun skips the images already segmented and redoes only the others, once they are readable
    for seed, name in enumerate(bad):
        (images / name).write_bytes(png_bytes(seed))
    assert run(images, "--model", model_dir, "-o", output) == 0
    out = capsys.readouterr().out
    assert "skipping 2 image(s) already segmented; pass --overwrite to redo them" in out
    assert "Segmented 4 image(s)" in out
    assert all(path.read_bytes() == data for path, data in segmented.items())
    assert len(list(output.iterdir())) == 6 * len(KINDS)


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


def error_line(stderr: str) -> str:
    """The one `error:` line of a command's stderr (beside transformers' progress bars), which has no traceback."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if "error:" in line]
    return line[line.index("error:") :]


def copy_folder(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class CodePayload:
    """Pickles to a call of os.system: a checkpoint that would run code if unpickled without weights-only loading."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


def as_pickled_bin(folder, extra):
    """Replace the folder's safetensors weights by a pytorch_model.bin holding them and `extra`."""
    state_dict = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state_dict, **extra}, folder / "pytorch_model.bin")


def without_some_weights(folder):
    state_dict = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state_dict.items() if "decode_head.classifier" not in k}, folder / "model.safetensors")


MODEL_FOLDER_DAMAGE = {
    "no weights": (lambda folder: (folder / "model.safetensors").unlink(), "no file named model.safetensors", OSError),
    "truncated safetensors": (
        lambda folder: truncate(folder / "model.safetensors"),
        "a .safetensors weights file is truncated or corrupt",
        SafetensorError,
    ),
    "0-byte safetensors": (
        lambda folder: (folder / "model.safetensors").write_bytes(b""),
        "a .safetensors weights file is truncated or corrupt",
        SafetensorError,
    ),
    "code in pytorch_model.bin": (
        lambda folder: as_pickled_bin(folder, {"x": CodePayload(folder.parent / "pwned")}),
        "its .bin weights hold pickled objects other than tensors, which are refused",
        pickle.UnpicklingError,
    ),
    "truncated pytorch_model.bin": (
        lambda folder: (as_pickled_bin(folder, {}), truncate(folder / "pytorch_model.bin")),
        "PytorchStreamReader failed reading zip archive",
        RuntimeError,
    ),
    "weights missing": (without_some_weights, "2 weight(s) of its config are missing from its weights", None),
    "no preprocessor config": (
        lambda folder: (folder / "preprocessor_config.json").unlink(),
        "Can't load image processor",
        None,
    ),
    "broken config.json": (lambda folder: (folder / "config.json").write_text("{oops"), "Expecting property", OSError),
}


@pytest.mark.parametrize("damage", list(MODEL_FOLDER_DAMAGE))
def test_model_folders_that_do_not_load_are_named(model_dir, tmp_path, capsys, damage):
    spoil, message, api_error = MODEL_FOLDER_DAMAGE[damage]
    model = copy_folder(model_dir, tmp_path / "model")
    spoil(model)
    (tmp_path / "photo.png").write_bytes(png_bytes(0))
    assert run(tmp_path / "photo.png", "--model", model, "-o", tmp_path / "out") == 1
    error = error_line(capsys.readouterr().err)
    assert error.startswith(f"error: Cannot load model {model}: ") and message in error, error
    assert not list((tmp_path / "out").iterdir())
    assert not (tmp_path / "pwned").exists()  # a pickled payload never runs
    if api_error is not None:  # the Python API raises transformers' / safetensors' / torch's own error
        with pytest.raises(api_error):
            SemaskForSemanticSegmentation.from_pretrained(model)
        assert not (tmp_path / "pwned").exists()


def pipeline_label_map(segmenter, image) -> np.ndarray:
    """The pipeline's masks as one (H, W) label map."""
    segments = segmenter(image)
    label_map = np.full(np.asarray(segments[0]["mask"]).shape, -1)
    for segment_ in segments:
        label_map[np.asarray(segment_["mask"]) == 255] = segmenter.model.config.label2id[segment_["label"]]
    return label_map


def cmyk_jpeg(path):
    array = np.random.default_rng(1).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    Image.fromarray(array, "CMYK").save(path, quality=95)


def palette_png(path):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)).quantize(32)
    image.info["transparency"] = 0
    image.save(path, transparency=0)


def rgba_png(path):
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA").save(path)


# file name: (writer, PIL mode of the file)
IMAGE_KINDS = {
    "EXIF-rotated.jpg": (exif_rotated_jpeg, "RGB"),
    "cmyk.jpg": (cmyk_jpeg, "CMYK"),
    "palette.png": (palette_png, "P"),
    "rgba.png": (rgba_png, "RGBA"),
}


@pytest.fixture(scope="module")
def segmenter(model_dir):
    return pipeline("image-segmentation", model=str(model_dir))


@pytest.mark.parametrize("name", list(IMAGE_KINDS))
def test_cmyk_palette_alpha_and_exif_images_read_alike_everywhere(model_dir, segmenter, tmp_path, name):
    path = tmp_path / "images" / "train" / name
    path.parent.mkdir(parents=True)
    write, mode = IMAGE_KINDS[name]
    write(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    upright = load_image(path)
    if name.startswith("EXIF"):
        assert upright.size == (30, 40)  # the stored 40x30 pixels turned a quarter
    processor = SemaskImageProcessor.from_pretrained(model_dir)
    expected = processor(np.asarray(upright), return_tensors="pt")["pixel_values"]
    with Image.open(path) as opened:  # the processor, given the PIL image or the file
        for image in (opened, str(path)):
            torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    # training and evaluation data: the datasets decoding of the file, then the transforms
    Image.fromarray(np.ones(upright.size[::-1], np.uint8)).save(tmp_path / "label.png")
    rows = Dataset.from_dict(
        {"image": [str(path)], "label": [str(tmp_path / "label.png")]},
        features=Features({"image": ImageFeature(), "label": ImageFeature()}),
    )
    batch = undecoded(rows)[:1]
    decoded = next(decoded_pairs(batch, "train", processor, num_labels=5))
    np.testing.assert_array_equal(np.asarray(decoded[0]), np.asarray(upright))  # what TrainTransform augments
    evaluated = EvalTransform(processor, num_labels=5)(batch)
    torch.testing.assert_close(evaluated["pixel_values"][0], expected[0], atol=0, rtol=0)
    assert evaluated["labels"][0].shape == expected.shape[-2:]
    # the pipeline (transformers' loader: EXIF, then RGB) and the CLI give the label maps of the Python API
    model = SemaskForSemanticSegmentation.from_pretrained(model_dir).eval()
    with torch.no_grad():
        outputs = model(expected)
    api = processor.post_process_semantic_segmentation(outputs, target_sizes=[upright.size[::-1]])[0].numpy()
    np.testing.assert_array_equal(pipeline_label_map(segmenter, str(path)), api)
    assert run(path, "--model", model_dir, "-o", tmp_path / "out") == 0
    expected_map = predict_probabilities(model, processor, upright).argmax(0).numpy()
    saved = np.asarray(Image.open(tmp_path / "out" / f"{path.stem}_labels.png"))
    np.testing.assert_array_equal(saved, expected_map)


def test_16_bit_image_in_the_pipeline_via_load_image(model_dir, segmenter, tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (30, 40), dtype=np.uint16)).save(path)
    # transformers' pipeline loader clips 16-bit images (convert("RGB")): give it semask's load_image(path)
    processor = SemaskImageProcessor.from_pretrained(model_dir)
    model = SemaskForSemanticSegmentation.from_pretrained(model_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(str(path), return_tensors="pt"))
    api = processor.post_process_semantic_segmentation(outputs, target_sizes=[(30, 40)])[0].numpy()
    np.testing.assert_array_equal(pipeline_label_map(segmenter, load_image(path)), api)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output_json", "{tmp}/missing/results.json"], "Cannot write --output_json {tmp}/missing/results.json"),
        (["--output_json", "{tmp}/kept.json"], "{tmp}/kept.json exists; pass --overwrite to replace it."),
        (["--model", "{tmp}/no-model"], "Cannot load model {tmp}/no-model: "),
        ([], "The dataset has 6 labels but {model} predicts 5"),
        (["--mode", "slide"], "--mode slide needs --crop_size"),
    ],
    ids=["output folder missing", "output exists", "model missing", "label count", "slide without crop"],
)
def test_evaluation_script_reports_bad_options_and_models(model_dir, tmp_path, capsys, arguments, message):
    (tmp_path / "kept.json").write_text("mine")
    given = [argument.format(tmp=tmp_path) for argument in arguments]
    options = ["--model", str(model_dir), "--dataset_name", "demo", "--demo_validation_size", "2"]
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate_semask").main([*options, *given])
    assert exit_info.value.code == 2
    error = error_line(capsys.readouterr().err)
    assert error.startswith("error: " + message.format(tmp=tmp_path, model=model_dir)), error
    assert (tmp_path / "kept.json").read_text() == "mine"
