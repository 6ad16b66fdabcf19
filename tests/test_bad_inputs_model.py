"""Bad input to the models' forward: labels of another size are refused, and NaN pixels propagate on the CPU
fast path exactly as on the plain (autograd) path instead of being laundered into plausible logits."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from conftest import tiny_config_kwargs, tiny_mask2former_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.configuration_semask_mask2former import SemaskMask2FormerConfig
from semask.modeling_semask_mask2former import SemaskMask2FormerForUniversalSegmentation


def test_labels_of_another_size_than_the_input_are_refused():
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    with pytest.raises(ValueError, match=r"`labels` are 16x16 \(HxW\) but the images 32x32"):
        model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 16, 16, dtype=torch.long))


def test_mask2former_labels_of_another_size_are_refused():
    model = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    with pytest.raises(ValueError, match=r"`labels` are 30x30 \(HxW\) but the images 32x32"):
        model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 30, 30, dtype=torch.long))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_nan_pixels_propagate_on_the_fast_path_as_on_the_plain_path(attention):
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    model.set_attn_implementation(attention)
    pixel_values = torch.randn(1, 3, 64, 64)
    pixel_values[0, 0, 10, 10] = float("nan")
    with torch.no_grad():  # the fast path (oneDNN kernels, in-place adds): what inference and the CLI use
        fast = model(pixel_values)
    plain = model(pixel_values.clone().requires_grad_())  # autograd: the plain modules
    for name in ("logits", "semantic_logits"):
        fast_nan, plain_nan = getattr(fast, name).isnan(), getattr(plain, name).isnan()
        assert plain_nan.any(), name
        assert torch.equal(fast_nan, plain_nan), f"{name}: NaN at {fast_nan.sum()} vs {plain_nan.sum()} positions"


def test_non_contiguous_id2label_keys_are_refused():
    with pytest.raises(StrictDataclassClassValidationError, match=r"ids 0\.\.1 .*got \[0, 2\] \(missing ids: \[1\]\)"):
        SemaskConfig(id2label={0: "wall", 2: "floor"})
    with pytest.raises(StrictDataclassClassValidationError, match=r"missing ids: \[1\]"):
        SemaskMask2FormerConfig(backbone_config=SemaskConfig(**tiny_config_kwargs()), id2label={0: "a", 2: "b"})


def test_integer_pixel_values_are_refused_naming_the_dtype():
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    with pytest.raises(TypeError, match=r"pixel_values must be floating point .* got torch\.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_mask2former_refuses_reentrant_checkpointing():
    model = SemaskMask2FormerForUniversalSegmentation(SemaskMask2FormerConfig(**tiny_mask2former_config_kwargs()))
    with pytest.raises(ValueError, match=r"does not support `use_reentrant=True`.*Use the default"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    model.activation_checkpointing_enable()  # the default, non-reentrant
    assert model.is_gradient_checkpointing
