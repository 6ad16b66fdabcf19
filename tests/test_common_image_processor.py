"""transformers' common image processor checks (`ImageProcessingTestMixin`, and Segformer's segmentation-map checks)
for `SemaskImageProcessor`.

Which of them apply: `APPLIED` (the check -> the tests here) and `NOT_APPLIED` (-> why not). Resizing against the
original pipelines is tested in tests/test_image_processing.py.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from common_checks import assert_check_table
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_processing_base import BatchFeature

from semask import SemaskImageProcessor

SIZE = {"shortest_edge": 32, "longest_edge": 64}
IMAGE_SHAPE = (30, 40)  # (H, W): resized to fit 64 x 32 keeping the ratio, x 32/30 -> 32 x 43
RESIZED = (32, 43)
INPUT_KINDS = {
    "numpy": lambda image: image,
    "pil": Image.fromarray,
    "torch": lambda image: torch.from_numpy(image).permute(2, 0, 1),
}

APPLIED = {
    "test_image_processor_to_json_string": "test_to_json_string",
    "test_image_processor_to_json_file": "test_to_json_file_and_save_pretrained",
    "test_image_processor_from_and_save_pretrained": "test_to_json_file_and_save_pretrained",
    "test_init_without_params": "test_init_without_params",
    "test_image_processor_from_dict_with_kwargs": "test_from_dict_with_kwargs",
    "test_image_processor_properties": "test_image_processor_properties",
    "test_call_pil / test_call_numpy / test_call_pytorch": ("test_call", "test_batched_equals_single"),
    "test_call_numpy_4_channels": "test_four_channels_and_channel_formats",
    "test_cast_dtype_device": "test_return_tensors_and_cast_dtype",
    "test_processor_accepts_only_valid_kwargs (preprocess arguments)": "test_unknown_arguments_are_refused",
    "SegformerImageProcessingTest.test_call_segmentation_maps": "test_segmentation_maps",
    "SegformerImageProcessingTest.test_reduce_labels": "test_segmentation_maps",
    "post_process_semantic_segmentation": "test_post_process_semantic_segmentation",
}
NOT_APPLIED = {
    "test_backends_equivalence / test_slow_fast_equivalence*": "one backend: the PIL one, whose resizing reproduces "
    "the original pipelines' OpenCV (SeMask-FPN) and PIL (SeMask-Mask2Former) resizing",
    "test_save_load_fast_slow*": "no fast (torchvision) processor",
    "test_can_compile_fast_image_processor": "no fast (torchvision) processor",
    "test_fast_is_faster_than_slow": "no fast (torchvision) processor",
    "data_format='channels_last' outputs": "transformers v5's PIL backend returns channels-first outputs whatever "
    "`data_format` (as Segformer's)",
}


@pytest.fixture(scope="module")
def processor() -> SemaskImageProcessor:
    return SemaskImageProcessor(size=SIZE)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*IMAGE_SHAPE, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture(scope="module")
def label_maps() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 6, IMAGE_SHAPE, dtype=np.uint8) for _ in range(3)]


def test_to_json_string(processor):
    saved = json.loads(processor.to_json_string())
    for key, value in processor.to_dict().items():
        if key != "auto_map":
            assert saved[key] == (list(value) if isinstance(value, tuple) else value), key
    assert saved["size"] == SIZE and saved["image_processor_type"] == "SemaskImageProcessor"


def test_to_json_file_and_save_pretrained(processor, tmp_path):
    processor.to_json_file(tmp_path / "processor.json")
    assert SemaskImageProcessor.from_json_file(tmp_path / "processor.json").to_dict() == processor.to_dict()
    processor.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()
    for loaded in (
        SemaskImageProcessor.from_pretrained(tmp_path / "saved"),
        AutoImageProcessor.from_pretrained(tmp_path / "saved"),
    ):
        assert type(loaded) is SemaskImageProcessor and loaded.to_dict() == processor.to_dict()


def test_init_without_params():
    """The defaults are the original ADE20K test pipeline."""
    processor = SemaskImageProcessor()
    assert processor.size == {"shortest_edge": 512, "longest_edge": 2048}
    assert processor.do_reduce_labels and not processor.do_rescale and not processor.do_pad
    assert list(processor.image_mean) == [123.675, 116.28, 103.53] and list(processor.image_std) == [
        58.395,
        57.12,
        57.375,
    ]


def test_from_dict_with_kwargs(processor):
    settings = processor.to_dict()
    assert SemaskImageProcessor.from_dict(settings).size == SIZE
    changed = SemaskImageProcessor.from_dict(settings, size={"height": 10, "width": 12}, do_reduce_labels=False)
    assert changed.size == {"height": 10, "width": 12} and changed.do_reduce_labels is False


def test_image_processor_properties(processor):
    for attribute in ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean"):
        assert hasattr(processor, attribute), attribute
    for attribute in ("image_std", "do_reduce_labels", "do_pad", "size_divisor", "resize_library"):
        assert hasattr(processor, attribute), attribute
    assert processor.model_input_names == ["pixel_values"]


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_call(processor, images, kind):
    """PIL images, (H, W, C) arrays and (C, H, W) tensors: one image and a batch, the same pixels."""
    convert = INPUT_KINDS[kind]
    single = processor(convert(images[0]), return_tensors="pt").pixel_values
    batch = processor([convert(image) for image in images], return_tensors="pt").pixel_values
    assert single.shape == (1, 3, *RESIZED) and batch.shape == (3, 3, *RESIZED) and single.dtype == torch.float32
    reference = processor(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(batch, reference, atol=0, rtol=0)


def test_batched_equals_single(processor, images):
    """A batch (list, stacked array or stacked tensor) gives each image what it gives alone."""
    singles = torch.cat([processor(image, return_tensors="pt").pixel_values for image in images])
    stacked = np.stack(images)
    for batch in (images, stacked, torch.from_numpy(stacked).permute(0, 3, 1, 2)):
        torch.testing.assert_close(processor(batch, return_tensors="pt").pixel_values, singles, atol=0, rtol=0)


def test_four_channels_and_channel_formats(processor, images):
    """RGBA drops its alpha; channels-first and channels-last inputs, told or guessed, give the same pixels."""
    reference = processor(images[0], return_tensors="pt").pixel_values
    rgba = np.dstack([images[0], np.full(IMAGE_SHAPE, 9, np.uint8)])
    torch.testing.assert_close(processor(rgba, return_tensors="pt").pixel_values, reference, atol=0, rtol=0)
    channels_first = np.ascontiguousarray(images[0].transpose(2, 0, 1))
    for image, data_format in (
        (images[0], "channels_last"),
        (channels_first, "channels_first"),
        (channels_first, None),
    ):
        outputs = processor(image, input_data_format=data_format, return_tensors="pt").pixel_values
        torch.testing.assert_close(outputs, reference, atol=0, rtol=0)


def test_return_tensors_and_cast_dtype(processor, images, label_maps):
    assert isinstance(processor(images[0], return_tensors="pt").pixel_values, torch.Tensor)
    assert isinstance(processor(images[0], return_tensors="np").pixel_values, np.ndarray)
    plain = processor(images[0]).pixel_values
    assert isinstance(plain, list) and plain[0].shape == (3, *RESIZED) and plain[0].dtype == np.float32
    outputs = processor(images, segmentation_maps=label_maps, return_tensors="pt")
    assert isinstance(outputs, BatchFeature)
    cast = outputs.to(torch.float16)
    assert cast.pixel_values.dtype == torch.float16 and cast["labels"].dtype == torch.int64  # labels stay integers
    cast = outputs.to("cpu", dtype=torch.bfloat16)
    assert cast.pixel_values.dtype == torch.bfloat16 and cast.pixel_values.device.type == "cpu"


def test_unknown_arguments_are_refused(processor, images):
    with pytest.raises(TypeError, match="not_an_argument"):
        processor(images[0], not_an_argument=1)


@pytest.mark.parametrize("kind", ["numpy", "pil", "torch"])
def test_segmentation_maps(processor, images, label_maps, kind):
    """Label maps of every input kind, alone and batched: (B, H, W) int64, resized with the images (nearest), and
    reduced (0 -> 255 ignored, k -> k - 1)."""
    convert = {"numpy": lambda m: m, "pil": Image.fromarray, "torch": torch.from_numpy}[kind]
    batch = processor(
        [INPUT_KINDS[kind](i) for i in images], segmentation_maps=[convert(m) for m in label_maps], return_tensors="pt"
    )
    single = processor(INPUT_KINDS[kind](images[0]), segmentation_maps=convert(label_maps[0]), return_tensors="pt")
    assert batch["labels"].shape == (3, *RESIZED) and batch["labels"].dtype == torch.int64
    torch.testing.assert_close(single["labels"], batch["labels"][:1], atol=0, rtol=0)
    unreduced = processor(images[:1], segmentation_maps=label_maps[:1], do_reduce_labels=False, return_tensors="pt")
    original = unreduced["labels"][0]
    assert set(original.unique().tolist()) <= set(range(6))
    expected = torch.where(original == 0, 255, original - 1)
    torch.testing.assert_close(batch["labels"][0], expected, atol=0, rtol=0)
    assert set(batch["labels"].unique().tolist()) <= {255, *range(5)}


def test_post_process_semantic_segmentation(processor):
    """Label maps at the target sizes (or at the logits' size), from the class with the highest score."""
    logits = torch.randn(2, 5, 8, 11)
    outputs = SimpleNamespace(logits=logits)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[IMAGE_SHAPE, (20, 25)])
    assert [tuple(m.shape) for m in maps] == [IMAGE_SHAPE, (20, 25)] and maps[0].dtype == torch.int64
    at_logits = processor.post_process_semantic_segmentation(outputs)
    torch.testing.assert_close(at_logits[1], logits[1].argmax(0), atol=0, rtol=0)


def test_check_table():
    assert_check_table(globals())
