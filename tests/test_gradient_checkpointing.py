"""Gradient checkpointing: the same losses, gradients and batch-norm statistics, far fewer tensors kept."""

import torch

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation


def training_step(model: SemaskForSemanticSegmentation, pixel_values, labels) -> tuple[torch.Tensor, int]:
    """One forward/backward under a fixed seed: the loss and the bytes of activations kept for the backward pass."""
    parameters = {parameter.data_ptr() for parameter in model.parameters()}
    kept = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(1)  # drop path draws the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(pixel_values, labels=labels).loss
    loss.backward()
    return loss.detach(), sum(kept.values())


def test_checkpointing_keeps_results_and_cuts_saved_activations():
    torch.manual_seed(0)
    config = SemaskConfig(**tiny_config_kwargs(drop_path_rate=0.2))
    plain = SemaskForSemanticSegmentation(config).train()
    checkpointed = SemaskForSemanticSegmentation(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    pixel_values, labels = torch.randn(2, 3, 96, 128), torch.randint(0, 5, (2, 96, 128))

    loss, kept = training_step(plain, pixel_values, labels)
    checkpointed_loss, checkpointed_kept = training_step(checkpointed, pixel_values, labels)

    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=1e-6)
    for (name, parameter), other in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(other.grad, parameter.grad, atol=1e-6, rtol=1e-5, msg=name)
    # Batch-norm statistics are updated once per step, not again when the head is recomputed.
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(other, buffer, atol=1e-7, rtol=0, msg=name)
    assert checkpointed_kept < 0.25 * kept, (checkpointed_kept, kept)
