"""`semask-segment` (semask.cli): outputs for a folder of images, modes, priors, palettes and clear errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskImageProcessor
from semask.cli import label_map_image, main
from semask.inference import predict_probabilities
from semask.palettes import ADE20K_PALETTE, CITYSCAPES_PALETTE, generated_palette, palette_for_labels
from semask.presets import ADE20K_LABELS, CITYSCAPES_LABELS

IMAGE_SIZES = {"a.png": (56, 40), "sub/b.jpg": (47, 33), "sub/deeper/c.png": (30, 64)}  # (width, height)
NUM_LABELS = 5


def save_tiny_model(folder, **overrides):
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(**overrides))).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(0.5)  # let the semantic layers act
    model.save_pretrained(folder)
    SemaskImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-semask")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGE_SIZES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image, not picked up")
    return folder


def run(*arguments):
    return main([str(argument) for argument in arguments])


def test_folder_gives_label_maps_overlays_and_legends(model_dir, image_dir, tmp_path):
    output = tmp_path / "out"
    assert run(image_dir, "--model", model_dir, "--output", output, "--alpha", 1.0) == 0
    palette = palette_for_labels(SemaskConfig(**tiny_config_kwargs()).id2label)
    model = SemaskForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = SemaskImageProcessor.from_pretrained(model_dir)
    for name, size in IMAGE_SIZES.items():
        stem = output / name.rsplit(".", 1)[0]
        labels = Image.open(f"{stem}_labels.png")
        assert labels.mode == "L" and labels.size == size
        label_map = np.asarray(labels)
        assert label_map.max() < NUM_LABELS
        image = Image.open(image_dir / name).convert("RGB")
        expected = predict_probabilities(model, processor, image).argmax(0).numpy()
        np.testing.assert_array_equal(label_map, expected)
        overlay = Image.open(f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == size
        np.testing.assert_array_equal(np.asarray(overlay), palette[label_map])  # alpha 1: pure class colours
        legend = Image.open(f"{stem}_legend.png")
        assert legend.height == 20 * len(np.unique(label_map)) + 8
    assert sorted(path.name for path in output.rglob("*.png")) == sorted(
        f"{name.rsplit('/', 1)[-1].rsplit('.', 1)[0]}_{kind}.png"
        for name in IMAGE_SIZES
        for kind in ("labels", "overlay", "legend")
    )


def test_overlay_blends_with_alpha(model_dir, image_dir, tmp_path):
    image = image_dir / "a.png"
    assert run(image, "--model", model_dir, "--output", tmp_path, "--alpha", 0) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_overlay.png")), np.asarray(Image.open(image)))


def test_priors_are_saved_per_stage(model_dir, image_dir, tmp_path):
    assert run(image_dir / "sub/deeper/c.png", "--model", model_dir, "-o", tmp_path, "--save-priors") == 0
    priors = Image.open(tmp_path / "c_priors.png")
    width, height = IMAGE_SIZES["sub/deeper/c.png"]
    panel = (round(width * 256 / 64), 256)  # longest side scaled to 256
    assert priors.mode == "RGB" and priors.size == (4 * panel[0] + 3 * 4, panel[1])
    colours = {tuple(colour) for colour in np.asarray(priors).reshape(-1, 3)}
    palette = {tuple(colour) for colour in palette_for_labels(SemaskConfig(**tiny_config_kwargs()).id2label)}
    assert colours <= palette | {(255, 255, 255)} and len(colours & palette) >= 2


@pytest.mark.parametrize(
    "mode_arguments", [["--mode", "slide", "--crop-size", "32", "--stride", "20"], ["--mode", "ms+flip"]]
)
def test_slide_and_ms_flip_modes(model_dir, image_dir, tmp_path, mode_arguments):
    assert run(image_dir / "a.png", "--model", model_dir, "-o", tmp_path, *mode_arguments) == 0
    label_map = np.asarray(Image.open(tmp_path / "a_labels.png"))
    assert label_map.shape == (40, 56) and label_map.max() < NUM_LABELS


def test_existing_outputs_are_kept_unless_overwrite(model_dir, image_dir, tmp_path, capsys):
    (tmp_path / "a_overlay.png").write_bytes(b"mine")
    assert run(image_dir / "a.png", "--model", model_dir, "-o", tmp_path) == 1
    assert "1 output file(s) already exist, e.g." in capsys.readouterr().err
    assert (tmp_path / "a_overlay.png").read_bytes() == b"mine" and not (tmp_path / "a_labels.png").exists()
    assert run(image_dir / "a.png", "--model", model_dir, "-o", tmp_path, "--overwrite") == 0
    assert Image.open(tmp_path / "a_overlay.png").size == (56, 40)


def test_outputs_inside_the_input_folder_are_not_segmented_again(model_dir, tmp_path, capsys):
    Image.new("RGB", (20, 12), "gray").save(tmp_path / "photo.jpg")
    for arguments in ([], ["--overwrite"]):
        assert run(tmp_path, "--model", model_dir, "-o", tmp_path / "out", *arguments) == 0
        assert "Segmented 1 image(s)" in capsys.readouterr().out
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_input_errors_are_clear(model_dir, image_dir, tmp_path, capsys):
    assert run(tmp_path / "missing.jpg", "--model", model_dir, "-o", tmp_path / "out") == 1
    assert f"Input not found: {tmp_path / 'missing.jpg'}" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    assert run(empty, "--model", model_dir, "-o", tmp_path / "out") == 1
    assert f"No images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp) found in folder {empty}" in capsys.readouterr().err

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert run(image_dir / "a.png", broken, "--model", model_dir, "-o", tmp_path / "out") == 1
    assert f"Cannot read image {broken}" in capsys.readouterr().err
    assert (tmp_path / "out" / "a_labels.png").is_file() and not (tmp_path / "out" / "broken_labels.png").exists()

    twin = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(twin)
    assert run(image_dir / "a.png", twin, "--model", model_dir, "-o", tmp_path / "out") == 1
    assert "would write the same outputs" in capsys.readouterr().err

    assert run(image_dir / "a.png", "--model", tmp_path / "no-model", "-o", tmp_path / "new") == 1
    assert f"Cannot load model {tmp_path / 'no-model'}" in capsys.readouterr().err


def test_bad_options_are_refused(model_dir, image_dir, tmp_path, capsys):
    for arguments, message in [
        (["--mode", "slide"], "--mode slide needs --crop-size"),
        (["--crop-size", "32"], "--crop-size and --stride only apply with --mode slide"),
        (["--alpha", "1.5"], "--alpha must be between 0 and 1"),
    ]:
        with pytest.raises(SystemExit):
            run(image_dir / "a.png", "--model", model_dir, "-o", tmp_path, *arguments)
        assert message in capsys.readouterr().err


def test_priors_need_semantic_layers(image_dir, tmp_path, capsys):
    plain = save_tiny_model(tmp_path / "swin-fpn", num_semantic_blocks=(0, 0, 0, 0))
    assert run(image_dir / "a.png", "--model", plain, "-o", tmp_path / "out", "--save-priors") == 1
    assert "--save-priors needs a SeMask model with semantic layers" in capsys.readouterr().err


def test_palettes():
    ade = palette_for_labels(dict(enumerate(ADE20K_LABELS)))
    assert ade.shape == (150, 3) and tuple(ade[0]) == (120, 120, 120) and tuple(ade[149]) == ADE20K_PALETTE[149]
    cityscapes = palette_for_labels(dict(enumerate(CITYSCAPES_LABELS)))
    assert tuple(cityscapes[0]) == (128, 64, 128) and tuple(cityscapes[18]) == CITYSCAPES_PALETTE[18] == (119, 11, 32)
    generated = palette_for_labels({0: "cat", 1: "dog", 2: "sky"})
    np.testing.assert_array_equal(generated, generated_palette(3))
    many = generated_palette(300)
    assert many.dtype == np.uint8 and len({tuple(colour) for colour in many}) == 300


def test_label_maps_above_256_classes_are_16_bit():
    label_map = np.array([[0, 255], [256, 299]])
    image = label_map_image(label_map, num_labels=300)
    assert image.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(image), label_map)
    assert label_map_image(label_map.clip(0, 255), num_labels=256).mode == "L"
