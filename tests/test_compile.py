"""torch.compile captures the whole model (no graph breaks) for inference and for a training step."""

import pytest
import torch

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_compiled_inference_equals_eager(attn_implementation):
    torch.manual_seed(0)
    config = SemaskConfig(**tiny_config_kwargs())
    model = SemaskForSemanticSegmentation._from_config(config, attn_implementation=attn_implementation).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    for size in ((64, 64), (40, 72)):  # each size compiles its own full graph
        pixel_values = torch.randn(2, 3, *size)
        with torch.inference_mode():
            expected, actual = model(pixel_values), compiled(pixel_values)
        torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual.semantic_logits, expected.semantic_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_step_equals_eager(checkpointing):
    torch.manual_seed(0)
    # No randomness: drop path and dropout off, so both runs compute the same function.
    config = SemaskConfig(**tiny_config_kwargs(drop_path_rate=0.0, classifier_dropout_prob=0.0))
    model = SemaskForSemanticSegmentation(config).train()
    reference = SemaskForSemanticSegmentation(config).train()
    reference.load_state_dict(model.state_dict())
    if checkpointing:
        model.activation_checkpointing_enable()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))

    loss = compiled(pixel_values, labels=labels).loss
    loss.backward()
    expected = reference(pixel_values, labels=labels).loss
    expected.backward()

    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for (name, parameter), other in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(other.grad, parameter.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, buffer), other in zip(reference.named_buffers(), model.buffers()):  # batch-norm statistics
        torch.testing.assert_close(other, buffer, atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_model_rejects_labels_outside_the_label_set():
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[1, 3, 4] = 7
    with pytest.raises(RuntimeError, match=r"Labels must lie in \[0, 5\)"):
        compiled(torch.randn(2, 3, 64, 64), labels=labels)
