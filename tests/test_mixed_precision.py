"""bf16 / fp16 autocast: finite outputs close to float32, semantic attention in float32, finite training steps."""

import pytest
import torch

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation


@pytest.fixture(scope="module")
def model() -> SemaskForSemanticSegmentation:
    torch.manual_seed(0)
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    with torch.no_grad():  # a trained-looking model: semantic layers switched on, large class scores
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(0.5)
            elif "q_proj.weight" in name or "k_proj.weight" in name:
                parameter.mul_(20)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_autocast_inference_is_finite_and_close_to_float32(model, dtype, attn_implementation):
    model.set_attn_implementation(attn_implementation)
    pixel_values = 3 * torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected = model(pixel_values)
        with torch.autocast("cpu", dtype=dtype):
            outputs = model(pixel_values, output_semantic_attentions=attn_implementation == "eager")
    for name in ("logits", "semantic_logits"):
        actual, reference = getattr(outputs, name).float(), getattr(expected, name)
        assert torch.isfinite(actual).all(), name
        relative_error = (actual - reference).norm() / reference.norm()
        assert relative_error < 0.05, (name, relative_error)
    assert (outputs.logits.argmax(1) == expected.logits.argmax(1)).float().mean() > 0.9
    if attn_implementation == "eager":  # the semantic softmax runs in float32 under autocast
        assert all(weights.dtype == torch.float32 for weights in outputs.semantic_attentions)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_is_finite(model, dtype):
    trainee = SemaskForSemanticSegmentation(model.config)
    trainee.load_state_dict(model.state_dict())
    trainee.train()
    pixel_values, labels = 3 * torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    with torch.autocast("cpu", dtype=dtype):
        loss = trainee(pixel_values, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(parameter.grad).all() for parameter in trainee.parameters() if parameter.grad is not None)
