"""SeMask-FPN's losses as computed (channels-last log-softmax) equal `F.cross_entropy` of the resized logits, in
value and gradient, for both reductions, with ignored pixels and sizes that are not a multiple of the stride."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation


@pytest.mark.parametrize("reduction", ["all_pixels", "valid_pixels"])
@pytest.mark.parametrize("size", [(64, 64), (61, 75)])
def test_cross_entropy_equals_torch_cross_entropy_in_value_and_gradient(reduction, size):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(loss_reduction=reduction))).double()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, (size[0] + 3) // 4, (size[1] + 3) // 4, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (2, *size), generator=generator)
    labels[:, :, :7] = 255
    labels[1, 10:20] = 255
    ours = logits.clone().requires_grad_(True)
    reference = logits.clone().requires_grad_(True)

    loss = model.cross_entropy(ours, labels)
    resized = F.interpolate(reference, size=size, mode="bilinear", align_corners=False)
    if reduction == "valid_pixels":
        expected = F.cross_entropy(resized, labels, ignore_index=255)
    else:
        expected = F.cross_entropy(resized, labels, ignore_index=255, reduction="none").mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-10, atol=1e-14)
    assert ours.grad.abs().sum() > 0


def test_every_pixel_ignored_gives_zero_or_nan_as_torch_does():
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    labels = torch.full((1, 32, 32), 255)
    assert model.cross_entropy(torch.randn(1, 5, 8, 8), labels).item() == 0.0  # all_pixels: 0 / numel
    model.config.loss_reduction = "valid_pixels"
    assert model.cross_entropy(torch.randn(1, 5, 8, 8), labels).isnan()  # as F.cross_entropy's mean
