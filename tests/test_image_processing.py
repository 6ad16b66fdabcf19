"""SemaskImageProcessor against the original (mmcv/OpenCV) test pipeline, input kinds, and saving/loading."""

import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from semask import SemaskImageProcessor, image_processing_semask
from semask.image_processing_semask import rescaled_size

ODD_SIZES = [(375, 500), (333, 1001), (97, 211), (1200, 300), (512, 2048), (1, 7)]


def mmcv_rescale_reference(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size(..., scale=(long, short)) written out independently: returns (new_h, new_w)."""
    max_long, max_short = max(scale), min(scale)
    factor = min(max_long / max(height, width), max_short / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


@pytest.mark.parametrize(("height", "width"), ODD_SIZES)
def test_keep_ratio_sizes_follow_mmcv_rule(height, width):
    assert rescaled_size(height, width, 512, 2048) == mmcv_rescale_reference(height, width, (2048, 512))
    image = Image.new("RGB", (width, height))
    pixel_values = SemaskImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert tuple(pixel_values.shape[-2:]) == mmcv_rescale_reference(height, width, (2048, 512))
    cityscapes = SemaskImageProcessor.from_dataset("cityscapes")(image, return_tensors="pt")["pixel_values"]
    assert tuple(cityscapes.shape[-2:]) == mmcv_rescale_reference(height, width, (2048, 1024))


@pytest.mark.parametrize(("height", "width"), ODD_SIZES[:4])
def test_pixels_match_opencv_resize_and_mmseg_normalisation(height, width, monkeypatch):
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    new_h, new_w = mmcv_rescale_reference(height, width, (2048, 512))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    expected = ((resized - mean) / std).transpose(2, 0, 1)
    ours = SemaskImageProcessor()(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)  # bit-exact resize with OpenCV installed
    monkeypatch.setattr(image_processing_semask, "cv2", None)
    fallback = SemaskImageProcessor()(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    # Without OpenCV, PyTorch's float interpolation differs from OpenCV's fixed point by at most one grey level.
    difference = np.abs(fallback - expected) * std[:, None, None]
    assert difference.max() <= 1.0 + 1e-3 and (difference > 0.5).mean() < 0.2


def test_label_maps_use_nearest_and_reduce_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 211, 3), dtype=np.uint8)
    label = rng.integers(0, 151, (97, 211), dtype=np.uint8)
    label[0, :5] = 255
    new_h, new_w = mmcv_rescale_reference(97, 211, (2048, 512))
    expected = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
    expected = np.where((expected == 0) | (expected == 255), 255, expected - 1)
    labels = SemaskImageProcessor()(image, segmentation_maps=Image.fromarray(label), return_tensors="pt")["labels"]
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels[0].numpy(), expected)
    assert set(np.unique(labels)) <= set(range(150)) | {255}  # never interpolated values
    kept = SemaskImageProcessor(do_reduce_labels=False, do_resize=False)(image, segmentation_maps=label)["labels"]
    np.testing.assert_array_equal(kept[0], label)


def test_fixed_size_mode_and_padding():
    image = np.full((30, 50, 3), 200, np.uint8)
    label = np.ones((30, 50), np.uint8)
    fixed = SemaskImageProcessor(size={"height": 64, "width": 48})(image, return_tensors="pt")
    assert fixed["pixel_values"].shape == (1, 3, 64, 48)
    out = SemaskImageProcessor(do_resize=False, size_divisor=32, do_reduce_labels=False)(
        image, segmentation_maps=label, return_tensors="pt"
    )
    assert out["pixel_values"].shape == (1, 3, 32, 64) and out["labels"].shape == (1, 32, 64)
    assert (out["pixel_values"][0, :, 30:] == 0).all() and (out["labels"][0, 30:] == 255).all()
    assert (out["labels"][0, :30, :50] == 1).all() and (out["labels"][0, :, 50:] == 255).all()
    batch = SemaskImageProcessor(do_resize=False, do_pad=True)(
        [image, np.zeros((40, 20, 3), np.uint8)], return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (2, 3, 40, 50)


def test_input_kinds_give_the_same_pixels():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    reference = processor(rgb, return_tensors="pt")["pixel_values"]
    variants = {
        "PIL": Image.fromarray(rgb),
        "torch CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "numpy CHW": rgb.transpose(2, 0, 1).copy(),
        "RGBA (alpha dropped)": Image.fromarray(np.dstack([rgb, np.full((40, 60), 7, np.uint8)])),
    }
    for name, variant in variants.items():
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], reference, msg=name)
    float_pixels = processor(rgb.astype(np.float32), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(float_pixels, reference, atol=1 / 57, rtol=0)  # float: not rounded to uint8
    gray = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    from_pil = processor(Image.fromarray(gray), return_tensors="pt")["pixel_values"]
    from_array = processor(gray, return_tensors="pt")["pixel_values"]
    from_rgb = processor(np.repeat(gray[..., None], 3, axis=2), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_pil, from_rgb)
    torch.testing.assert_close(from_array, from_rgb)
    sixteen = (gray.astype(np.uint16) * 257).astype(np.uint16)
    torch.testing.assert_close(
        processor(Image.fromarray(sixteen), return_tensors="pt")["pixel_values"], from_rgb, atol=1 / 57, rtol=0
    )


@pytest.mark.parametrize(
    ("images", "maps", "message"),
    [
        (np.zeros((8, 8, 2), np.uint8), None, "1 (grayscale), 3 (RGB) or 4 (RGBA) channels"),
        (np.zeros((8, 8, 3), np.int32), None, "Unsupported image dtype int32"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), np.uint8), "same size"),
        (np.zeros((8, 8, 3), np.uint8), Image.new("RGB", (8, 8)), "single-channel class-id"),
        (np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 0.5, np.float32), "integer class ids"),
        ([np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((8, 8), np.uint8)], "2 images but 1 segmentation maps"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)], None, "do_pad=True"),
    ],
)
def test_bad_inputs_are_rejected_clearly(images, maps, message):
    processor = SemaskImageProcessor(do_resize=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        processor(images, segmentation_maps=maps, return_tensors="pt")


def test_post_processing_returns_original_sizes():
    logits = torch.randn(2, 5, 16, 24)
    outputs = type("Outputs", (), {"logits": logits})()
    maps = SemaskImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(375, 500), (31, 17)])
    assert [tuple(m.shape) for m in maps] == [(375, 500), (31, 17)]
    assert all(m.dtype == torch.int64 and m.max() < 5 for m in maps)


def test_saved_processor_loads_with_auto_class_and_remote_code(tmp_path):
    SemaskImageProcessor.from_dataset("cityscapes").save_pretrained(tmp_path)
    assert (tmp_path / "image_processing_semask.py").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SemaskImageProcessor)
    assert loaded.size.shortest_edge == 1024 and loaded.do_reduce_labels is False
    script = (
        "import sys; sys.modules['semask'] = None\n"
        "from transformers import AutoImageProcessor\n"
        f"p = AutoImageProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)\n"
        "import numpy as np\n"
        "print(type(p).__name__, tuple(p(np.zeros((100, 300, 3), np.uint8), return_tensors='pt').pixel_values.shape))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SemaskImageProcessor", "(1,", "3,", "683,", "2048)"]


def test_pil_resizing_reproduces_detectron2():
    """resize_library="pil" (SeMask-Mask2Former): PIL bilinear for images, PIL nearest for label maps."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (97, 211, 3), dtype=np.uint8)
    label = rng.integers(0, 150, (97, 211), dtype=np.uint8)
    new_h, new_w = mmcv_rescale_reference(97, 211, (2560, 640))
    processor = SemaskImageProcessor(
        size={"shortest_edge": 640, "longest_edge": 2560}, resize_library="pil", do_normalize=False
    )
    outputs = processor(image, segmentation_maps=label, do_reduce_labels=False, return_tensors="np")
    expected_image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32)
    expected_label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    np.testing.assert_array_equal(outputs["pixel_values"][0].transpose(1, 2, 0), expected_image)
    np.testing.assert_array_equal(outputs["labels"][0], expected_label)
    with pytest.raises(ValueError, match="Unknown resize_library 'skimage'"):
        SemaskImageProcessor(resize_library="skimage")(image)
