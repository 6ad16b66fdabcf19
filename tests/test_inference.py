"""Whole, sliding-window and multi-scale + flip inference (semask.inference)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import SemanticSegmenterOutput

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskImageProcessor
from semask.inference import MS_FLIP_SCALES, predict_logits, predict_probabilities


class PointwiseModel(torch.nn.Module):
    """A per-pixel classifier (1x1 conv, full-resolution logits): every inference mode must agree with it."""

    def __init__(self, num_labels: int = 4):
        super().__init__()
        self.config = SemaskConfig(**tiny_config_kwargs())
        self.classifier = torch.nn.Conv2d(3, num_labels, 1)

    def forward(self, pixel_values: torch.Tensor) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.classifier(pixel_values))


@pytest.fixture(scope="module")
def tiny_model() -> SemaskForSemanticSegmentation:
    torch.manual_seed(0)
    return SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))


def test_whole_inference_resizes_to_the_input_then_the_original_size(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 96)
    logits = tiny_model(pixel_values).logits
    at_input = torch.nn.functional.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.interpolate(at_input, size=(45, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(predict_logits(tiny_model, pixel_values, output_size=(45, 70)), expected)


def test_slide_equals_whole_when_the_crop_covers_the_image(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 96)
    whole = predict_logits(tiny_model, pixel_values)
    torch.testing.assert_close(predict_logits(tiny_model, pixel_values, mode="slide", crop_size=(64, 96)), whole)
    torch.testing.assert_close(predict_logits(tiny_model, pixel_values, mode="slide", crop_size=128), whole)


def test_slide_over_an_image_larger_than_the_crop_stitches_and_averages_exactly():
    model = PointwiseModel().eval()
    pixel_values = torch.randn(2, 3, 70, 101)
    whole = predict_logits(model, pixel_values)
    for crop, stride in [((32, 32), (21, 21)), ((40, 64), (40, 64)), ((33, 50), (10, 7))]:
        slid = predict_logits(model, pixel_values, mode="slide", crop_size=crop, stride=stride)
        torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


def test_slide_with_semask_covers_every_pixel(tiny_model):
    pixel_values = torch.randn(1, 3, 80, 120)
    slid = predict_logits(tiny_model, pixel_values, mode="slide", crop_size=64, output_size=(50, 75))
    assert slid.shape == (1, 5, 50, 75) and torch.isfinite(slid).all()
    # Overlapping windows see different contexts, so the result differs from whole inference but stays close.
    assert not torch.allclose(slid, predict_logits(tiny_model, pixel_values, output_size=(50, 75)))


def test_single_scale_without_flip_equals_whole_inference(tiny_model, image):
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    expected = predict_logits(tiny_model, pixel_values, output_size=(45, 70)).softmax(1)[0]
    probabilities = predict_probabilities(tiny_model, processor, image)
    torch.testing.assert_close(probabilities, expected)
    assert probabilities.shape == (5, 45, 70)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(45, 70))


def test_multi_scale_and_flip_average_probabilities(tiny_model, image):
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    scales = (0.5, 1.0, 1.5)
    expected = 0
    for ratio in scales:
        size = {"shortest_edge": int(64 * ratio), "longest_edge": int(128 * ratio)}
        pixel_values = processor(image, size=size, return_tensors="pt")["pixel_values"]
        expected += predict_logits(tiny_model, pixel_values, output_size=(45, 70)).softmax(1)[0]
        flipped = predict_logits(tiny_model, pixel_values.flip(-1), output_size=(45, 70)).softmax(1)[0]
        expected += flipped.flip(-1)
    probabilities = predict_probabilities(tiny_model, processor, image, scales=scales, flip=True)
    torch.testing.assert_close(probabilities, expected / 6)
    assert MS_FLIP_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_flip_is_exact_for_a_flip_equivariant_model(image):
    model = PointwiseModel().eval()
    processor = SemaskImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    plain = predict_probabilities(model, processor, image)
    torch.testing.assert_close(predict_probabilities(model, processor, image, flip=True), plain)
    slide = predict_probabilities(model, processor, image, mode="slide", crop_size=32, scales=(1.0,), flip=True)
    torch.testing.assert_close(slide, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "tiles"}, "Unknown inference mode 'tiles'"),
        ({"mode": "slide"}, "needs `crop_size`"),
        ({"mode": "slide", "crop_size": 0}, "must be positive"),
        ({"scales": ()}, "at least one ratio"),
    ],
)
def test_bad_arguments_are_rejected(tiny_model, image, kwargs, message):
    processor = SemaskImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    with pytest.raises(ValueError, match=message):
        predict_probabilities(tiny_model, processor, image, **kwargs)
