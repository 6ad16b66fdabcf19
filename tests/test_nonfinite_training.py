"""Non-finite guards in training: a NaN / infinite loss stops `SemaskTrainer` before the optimiser step, naming the
step and the batch (saved), with the weights and BatchNorm statistics of the step before; fp16 autocast training of
a tiny SeMask on the CPU stays finite over 50 steps."""

import re

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from conftest import tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.training import RecipeArguments, SemaskTrainer
from semask.training.trainer import NonFiniteLossError

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train on one thread: small models run many small ops, which are fastest without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model() -> SemaskForSemanticSegmentation:
    torch.manual_seed(0)
    return SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs(depths=(1, 1, 1, 1))))


def examples(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(3, SIZE, SIZE, generator=generator),
            "labels": torch.randint(0, 5, (SIZE, SIZE), generator=generator),
        }
        for _ in range(count)
    ]


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    settings = {
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "remove_unused_columns": False,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(str(output_dir), **settings)


class WeightsAfterEachStep(TrainerCallback):
    def __init__(self, model: torch.nn.Module):
        self.weights = [{name: value.clone() for name, value in model.state_dict().items()}]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({name: value.clone() for name, value in model.state_dict().items()})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training_before_the_weights_take_it_in(tmp_path, value):
    data = examples(8)
    data[5]["pixel_values"][1, 7, 9] = value  # one bad pixel in one training example
    model = tiny_model()
    recorder = WeightsAfterEachStep(model)
    arguments = training_arguments(tmp_path, num_train_epochs=1)
    trainer = SemaskTrainer(model, arguments, recipe=RecipeArguments(), train_dataset=data, callbacks=[recorder])
    with pytest.raises(NonFiniteLossError, match=r"The training loss is nan at step (\d+) \(epoch") as error:
        trainer.train()
    step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert len(recorder.weights) == step  # steps 1 .. step - 1 were completed
    message = str(error.value)
    assert f"pixel_values (2, 3, {SIZE}, {SIZE}) with 1 non-finite values" in message
    assert "labels with the values [0, 1, 2, 3, 4]" in message and "The weights were not updated with it" in message
    saved = torch.load(tmp_path / f"non_finite_batch_step_{step}.pt")
    assert f"saved to {tmp_path / f'non_finite_batch_step_{step}.pt'}" in message
    assert (~torch.isfinite(saved["pixel_values"])).sum() == 1 and saved["labels"].shape == (2, SIZE, SIZE)
    for name, expected in recorder.weights[-1].items():  # exactly the weights after the last finite step
        assert torch.equal(model.state_dict()[name], expected), name
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())


def train_50_steps(pixel_values: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None) -> tuple:
    """A tiny SeMask trained 50 AdamW steps on one batch, under CPU autocast to `dtype` (with a gradient scaler) or
    in float32; the losses, the model, the dtypes its classifier computed in and the steps the scaler skipped (for
    non-finite gradients)."""
    model = tiny_model().train()
    dtypes = set()
    model.decode_head.classifier.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=dtype == torch.float16)
    losses, skipped = [], 0
    for _ in range(50):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale  # the scale shrinks when the gradients were not finite
        losses.append(loss.item())
    return torch.tensor(losses), model, dtypes, skipped


def test_fp16_autocast_training_on_the_cpu_stays_finite_for_50_steps():
    # On the CPU, Trainer(fp16=True) does not autocast (accelerate enables fp16 autocast on accelerators only; the
    # training script refuses --fp16 there), so this trains under torch's CPU fp16 autocast with a gradient scaler.
    pixel_values = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    labels = (pixel_values[:, 0] > 0).long() + 2 * (pixel_values[:, 1] > 0).long()  # learnable: 4 of the 5 classes
    losses, model, dtypes, skipped = train_50_steps(pixel_values, labels, torch.float16)
    assert dtypes == {torch.float16}  # the convolutions ran in fp16
    assert torch.isfinite(losses).all() and skipped == 0, (losses, skipped)  # finite losses and gradients
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    reference, _, reference_dtypes, _ = train_50_steps(pixel_values, labels, None)
    assert reference_dtypes == {torch.float32}
    assert losses[-5:].mean() < 0.9 * losses[:5].mean()  # it learns ...
    torch.testing.assert_close(losses, reference, rtol=0.03, atol=0)  # ... as float32 training does
