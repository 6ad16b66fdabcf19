"""Bad inputs to SemaskImageProcessor and semask.inference: refused early with a clear ValueError, or warned about."""

import logging as python_logging
import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.testing_utils import CaptureLogger

from conftest import exif_rotated_jpeg
from semask import SemaskImageProcessor, image_processing_semask
from semask.image_processing_semask import load_image
from semask.inference import original_size, predict_probabilities


class PointwiseModel(torch.nn.Module):
    """A 1x1-conv classifier with full-resolution logits: enough for `predict_probabilities`."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace()
        self.classifier = torch.nn.Conv2d(3, 2, 1)

    def forward(self, pixel_values: torch.Tensor) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.classifier(pixel_values))


def one_nan(dtype: type) -> np.ndarray:
    image = np.full((8, 8, 3), 100, dtype)
    image[3, 4, 1] = np.nan
    return image


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), np.nan, np.float32), "The image has 192 non-finite (NaN or infinite) values"),
        (one_nan(np.float32), "The image has 1 non-finite"),
        (one_nan(np.float64), "The image has 1 non-finite"),
        (np.full((8, 8, 3), np.inf, np.float32), "192 non-finite"),
    ],
)
def test_non_finite_pixels_are_refused(image, message):
    with pytest.raises(ValueError, match=re.escape(message) + ".*finite float pixels on the 0-255 scale"):
        SemaskImageProcessor()(image)


@pytest.mark.parametrize(
    ("image", "kwargs", "message"),
    [
        (np.zeros((2, 9000, 3), np.uint8), {}, "Resizing 2x9000 (HxW) to fit 2048x512 gives 0x2048: each side must"),
        (np.zeros((9000, 2), np.uint8), {}, "Resizing 9000x2 (HxW) to fit 2048x512 gives 2048x0"),
        (np.zeros((0, 0, 3), np.uint8), {}, "Empty image (0x0, HxW)"),
        (np.zeros((0, 5, 3), np.uint8), {"do_resize": False}, "Empty image (0x5, HxW)"),
    ],
)
def test_sizes_that_leave_no_pixel_are_refused(image, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SemaskImageProcessor(**kwargs)(image)


@pytest.mark.parametrize(("height", "width", "resized"), [(5, 3000, (3, 2048)), (3, 9000, (1, 2048))])
def test_extreme_but_resizable_aspect_ratios_are_processed(height, width, resized):
    image = np.zeros((height, width, 3), np.uint8)  # (3, W, 3) is ambiguous: say where the channels are
    pixel_values = SemaskImageProcessor()(image, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, *resized)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scales": [-1.0]}, "got -1.0 in `scales`"),
        ({"scales": [1.0, 0.0]}, "got 0.0 in `scales`"),
        ({"scales": [float("nan")]}, "got nan in `scales`"),
        ({"scales": [float("inf")]}, "got inf in `scales`"),
        ({"scales": ["1.0"]}, "got '1.0' in `scales`"),
        ({"scales": [1e-9]}, "Scale 1e-09 shrinks the processor's size"),
        ({"mode": "slide", "crop_size": 32.5}, "`crop_size` must be positive: an int or a (height, width) pair"),
        ({"mode": "slide", "crop_size": (32, 0)}, "`crop_size` must be positive"),
        ({"mode": "slide", "crop_size": 16, "stride": (8, 0)}, "`stride` must be positive"),
        ({"mode": "slide", "crop_size": 16, "stride": 17}, "`stride` (17, 17) must be between 1 and `crop_size`"),
    ],
)
def test_bad_inference_settings_are_refused(kwargs, message):
    processor = SemaskImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=re.escape(message)):
        predict_probabilities(PointwiseModel().eval(), processor, image, **kwargs)


def test_one_pixel_rgb_array_is_read_channels_last():
    colour = np.array([200, 10, 60], np.uint8)
    image = colour.reshape(1, 1, 3)
    pixel_values = SemaskImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape) == (1, 3, 512, 512)
    expected = (colour - np.array(image_processing_semask.MMSEG_IMAGE_MEAN)) / image_processing_semask.MMSEG_IMAGE_STD
    torch.testing.assert_close(pixel_values[0, :, 0, 0], torch.tensor(expected, dtype=torch.float32))
    assert (pixel_values == pixel_values[..., :1, :1]).all()
    assert original_size(image) == (1, 1) and original_size(torch.from_numpy(image)) == (1, 1)
    chw = SemaskImageProcessor()(image, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    assert tuple(chw.shape) == (1, 3, 512, 1536)  # one grayscale channel, 1x3 pixels
    scores = predict_probabilities(PointwiseModel().eval(), SemaskImageProcessor(), image)
    assert tuple(scores.shape) == (2, 1, 1)


def test_float_images_in_unit_range_warn_and_the_advice_works():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    processor = SemaskImageProcessor(do_resize=False)
    reference = processor(rgb, return_tensors="pt")["pixel_values"]
    unit = rgb.astype(np.float32) / 255
    python_logging.Logger.warning_once.cache_clear()  # transformers' warning_once remembers messages
    with CaptureLogger(image_processing_semask.logger) as captured:
        processor(unit)
    assert "values in [0, 1]" in captured.out and "do_rescale=True, rescale_factor=255.0" in captured.out
    python_logging.Logger.warning_once.cache_clear()
    with CaptureLogger(image_processing_semask.logger) as captured:
        rescaled = processor(unit, do_rescale=True, rescale_factor=255.0, return_tensors="pt")["pixel_values"]
        processor(np.zeros((8, 16, 3), np.float32))  # black, not [0, 1] data
    assert captured.out == ""
    torch.testing.assert_close(rescaled, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(processor(unit * 255, return_tensors="pt")["pixel_values"], reference, atol=1e-4, rtol=0)


def test_exif_rotated_jpeg_is_read_upright_by_every_entry_point(tmp_path):
    path = tmp_path / "rotated.jpg"
    upright = exif_rotated_jpeg(path)
    assert upright.shape == (40, 30, 3)  # orientation 6: the stored 30x40 pixels turned a quarter
    processor = SemaskImageProcessor()
    expected = processor(upright, return_tensors="pt")["pixel_values"]
    with Image.open(path) as image:
        assert original_size(image) == (40, 30)
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    np.testing.assert_array_equal(np.asarray(load_image(path)), upright)


def decompression_bomb_png(path, side: int = 30000):
    """A PNG header claiming side x side pixels (beyond PIL's `Image.MAX_IMAGE_PIXELS` guard), without pixel data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunks = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data in ((b"IHDR", header), (b"IEND", b""))
    )
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            np.zeros(8, np.uint8),
            "Images must be (H, W, C), (C, H, W) or (H, W) arrays or a batch of them, got shape (8,)",
        ),
        (np.zeros((1, 1, 4, 4, 3), np.uint8), "got shape (1, 1, 4, 4, 3)"),
        ([], "No images given: pass an image"),
        ("missing/photo.png", "Image file not found: missing/photo.png"),
        (Path("missing/photo"), "Image file not found: missing/photo"),
        (Image.new("F", (4, 4), 0.5), "A 32-bit float image (mode F) has no known pixel scale"),
        (Image.new("I", (4, 4), 70000), "A 32-bit integer image (mode I) with values 70000..70000: semask reads"),
        (Image.new("I", (4, 4), -5), "A 32-bit integer image (mode I) with values -5..-5"),
    ],
    ids=["1-d", "5-d", "no images", "missing file", "missing path", "mode F", "mode I > 65535", "mode I < 0"],
)
def test_images_of_other_ranks_modes_or_missing_files_are_refused(image, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SemaskImageProcessor()(image)


def test_one_dimensional_segmentation_map_is_refused():
    with pytest.raises(ValueError, match=re.escape("Segmentation maps must be (H, W) arrays or a batch of them")):
        SemaskImageProcessor()(np.zeros((4, 4, 3), np.uint8), segmentation_maps=np.zeros(16, np.uint8))


@pytest.mark.parametrize(("height", "width"), [(3, 40), (1, 40), (4, 40), (3, 3), (40, 3)])
def test_grayscale_arrays_are_read_as_height_by_width(height, width):
    gray = np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)
    processor = SemaskImageProcessor(size={"shortest_edge": 16, "longest_edge": 64})
    rgb = processor(np.repeat(gray[..., None], 3, 2), input_data_format="channels_last", return_tensors="pt")
    for image in (gray, torch.from_numpy(gray), Image.fromarray(gray)):  # never taken for a channels-first image
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, rgb["pixel_values"], atol=0, rtol=0)
    assert tuple(predict_probabilities(PointwiseModel().eval(), processor, gray).shape) == (2, height, width)


def test_alpha_is_dropped_and_palettes_and_cmyk_converted_alike():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 10, 4), dtype=np.uint8)
    processor = SemaskImageProcessor(do_resize=False)
    expected = processor(np.ascontiguousarray(rgba[..., :3]), return_tensors="pt")["pixel_values"]
    for image in (rgba, np.ascontiguousarray(rgba.transpose(2, 0, 1)), Image.fromarray(rgba, "RGBA")):
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    gray = processor(np.ascontiguousarray(rgba[..., 0]), return_tensors="pt")["pixel_values"]
    grey_alpha = Image.fromarray(np.ascontiguousarray(rgba[..., :2]), "LA")
    torch.testing.assert_close(processor(grey_alpha, return_tensors="pt")["pixel_values"], gray, atol=0, rtol=0)
    for image in (Image.fromarray(rgba, "CMYK"), Image.fromarray(rgba[..., 0]).quantize(16)):
        reference = processor(np.asarray(image.convert("RGB")), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], reference, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("image", "kwargs", "warning"),
    [
        (np.full((4, 4, 3), -20.0, np.float32), {}, "values outside [0, 255] after rescaling"),
        (np.full((4, 4, 3), 300.0, np.float32), {}, "values outside [0, 255] after rescaling"),
        (np.full((4, 4, 3), 200, np.uint8), {"do_rescale": True}, "all its values in [0, 1] (as torchvision"),
        (np.full((4, 4, 3), -20.0, np.float32), {"do_normalize": False}, None),
        (np.full((4, 4, 3), 200.0, np.float32), {}, None),
    ],
    ids=["negative", "above 255", "uint8 rescaled by 1/255", "not normalised", "on the 0-255 scale"],
)
def test_images_off_the_0_255_scale_warn(image, kwargs, warning):
    python_logging.Logger.warning_once.cache_clear()
    with CaptureLogger(image_processing_semask.logger) as captured:
        SemaskImageProcessor(do_resize=False, **kwargs)(image)
    if warning is None:
        assert captured.out == ""
    else:
        assert warning in captured.out and "0-255 scale" in captured.out


def test_image_files_given_as_paths_are_read_by_the_shared_rule(tmp_path):
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 65536, (20, 30), dtype=np.uint16)).save(sixteen)
    rotated = tmp_path / "rotated.jpg"
    exif_rotated_jpeg(rotated)
    processor = SemaskImageProcessor()
    for path in (sixteen, rotated):  # 16-bit scaled (transformers' own loader would clip), EXIF applied
        expected = processor(load_image(path), return_tensors="pt")["pixel_values"]
        for given in (str(path), path, [str(path)]):
            torch.testing.assert_close(processor(given, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"Cannot read image {tmp_path / 'empty.png'}: ")):
        processor(str(tmp_path / "empty.png"))


def test_decompression_bomb_is_refused_naming_the_file(tmp_path):
    path = decompression_bomb_png(tmp_path / "huge.png")
    message = re.escape(f"Cannot read image {path}: Image size (900000000 pixels) exceeds limit")
    with pytest.raises(ValueError, match=message):
        load_image(path)
    with pytest.raises(ValueError, match=message):
        SemaskImageProcessor()(str(path))


def test_predict_probabilities_reads_image_files(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    processor = SemaskImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    model = PointwiseModel().eval()
    expected = predict_probabilities(model, processor, load_image(path))
    torch.testing.assert_close(predict_probabilities(model, processor, str(path)), expected, atol=0, rtol=0)
