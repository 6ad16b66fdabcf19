"""The training script under `accelerate launch` with 2 CPU processes (gloo): one model folder, correctly reduced
metrics; and the padding that lets differently sized evaluation batches be gathered across processes."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from test_training import load_script, make_trainer

from conftest import REPO_ROOT, tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation

NUM_TRAIN, NUM_VALIDATION, BATCH_SIZE, EPOCHS = 20, 7, 4, 2  # 7 validation images: the last batch is uneven


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_once_and_reduce_metrics_like_one(tmp_path):
    output_dir = tmp_path / "run"
    data = (
        f"--dataset_name demo --demo_train_size {NUM_TRAIN} --demo_validation_size {NUM_VALIDATION} "
        "--demo_image_size 64 --image_scale 256 64"  # evaluation at the images' own size, as evaluate_semask.py does
    ).split()
    schedule = (
        f"--num_train_epochs {EPOCHS} --per_device_train_batch_size {BATCH_SIZE} --per_device_eval_batch_size 2 "
        "--warmup_steps 2 --logging_steps 1"
    ).split()
    # `--multi_gpu` makes accelerate start the processes through torchrun; with no GPU (the demo sets use_cpu)
    # they train on the CPU with gloo. (`--cpu` alone starts one process: accelerate runs multi-CPU only via mpirun.)
    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no"
    command = [
        sys.executable,
        *launch.split(),
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(REPO_ROOT / "scripts" / "train_semask.py"),
        *data,
        *schedule,
        "--output_dir",
        str(output_dir),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=environment, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Validation mIoU") == 1  # the end-of-training work runs on the main process only

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == EPOCHS * math.ceil(NUM_TRAIN / (2 * BATCH_SIZE))  # batches shared by 2 processes
    assert sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*.safetensors")) == [
        "model.safetensors"
    ]
    assert [path.name for path in output_dir.rglob("config.json")] == ["config.json"]

    saved = json.loads((output_dir / "eval_results.json").read_text())
    evaluate_args = ["--model", str(output_dir), "--device", "cpu", *data[:8]]
    single_process = load_script("evaluate_semask").main(evaluate_args)
    assert saved["eval_mean_iou"] == pytest.approx(single_process["mean_iou"], abs=1e-9)
    assert saved["eval_overall_accuracy"] == pytest.approx(single_process["overall_accuracy"], abs=1e-9)
    assert saved["eval_per_category_iou"] == pytest.approx(single_process["per_category_iou"], abs=1e-9, nan_ok=True)


def test_evaluation_batches_are_padded_to_the_largest_across_processes(tmp_path, monkeypatch):
    """With several processes, pixels are padded with 0 and labels with 255 to the size another process has."""
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    trainer = make_trainer(tmp_path, model)
    other_process_size = {-2: 40, -1: 48}  # the largest (height, width) in this step, on another process

    def pad_across_processes(tensor, dim=0, pad_index=0, pad_first=False):
        padding = [0, 0] * (tensor.ndim - 1 - dim) + [0, other_process_size[dim - tensor.ndim] - tensor.shape[dim]]
        return torch.nn.functional.pad(tensor, padding, value=pad_index)

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "pad_across_processes", pad_across_processes)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 36), "labels": torch.randint(0, 5, (2, 32, 36))}
    loss, logits, labels = trainer.prediction_step(model, inputs, prediction_loss_only=False)
    assert labels.shape == (2, 40, 48) and torch.equal(labels[:, :32, :36], inputs["labels"])
    assert torch.all(labels[:, 32:] == 255) and torch.all(labels[:, :, 36:] == 255)
    assert logits.shape == (2, 5, 10, 12)  # the logits of the padded input; only the logits are gathered
    padded_pixels = torch.nn.functional.pad(inputs["pixel_values"], (0, 12, 0, 8))
    assert torch.allclose(logits, model(padded_pixels).logits, atol=1e-6)
