"""Interrupted training (`scripts/train_semask.py`): a run stopped after a checkpoint and resumed with
`--resume_from_checkpoint` reaches the weights and metrics of an uninterrupted run with the same seed; a truncated or
corrupt checkpoint is refused before training, naming the newest intact earlier one, which still resumes exactly."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_nonfinite_training import one_thread  # noqa: F401  (autouse: train on one thread)
from transformers import TrainerCallback

from conftest import load_script, tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation
from semask.demo_data import DEMO_LABELS
from semask.training.trainer import CheckpointError, checkpoint_problems, resolve_resume_checkpoint

# 8 images in batches of 4: 2 steps per epoch, a checkpoint at the end of each (mid-epoch ones resume the weights,
# optimiser, schedule and data order, but the next batch's augmentation draws other random numbers: see the warning).
STEPS, INTERRUPTED_AFTER = 6, 4
OPTIONS = (
    "--dataset_name demo --demo_train_size 8 --demo_validation_size 2 --demo_image_size 32 --image_scale 128 32 "
    f"--crop_size 32 --per_device_train_batch_size 4 --max_steps {STEPS} --save_strategy epoch --eval_strategy no "
    "--logging_steps 2 --warmup_steps 2 --report_to none --seed 7"
).split()
METRICS = ("eval_loss", "eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou")


class Interrupted(Exception):
    """Stands for a run killed right after a checkpoint was written."""


class InterruptAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == INTERRUPTED_AFTER:
            raise Interrupted


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (its metrics) and a run interrupted after `checkpoint-4`, with their folders."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    config = SemaskConfig(**tiny_config_kwargs(id2label=dict(enumerate(DEMO_LABELS))))
    SemaskForSemanticSegmentation(config).save_pretrained(root / "tiny")
    options = [*OPTIONS, "--model_name_or_path", str(root / "tiny")]
    script = load_script("train_semask")
    metrics = script.main([*options, "--output_dir", str(root / "full")])

    class InterruptedTrainer(script.SemaskTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(InterruptAfterCheckpoint())

    trainer = script.SemaskTrainer
    script.SemaskTrainer = InterruptedTrainer
    try:
        with pytest.raises(Interrupted):
            script.main([*options, "--output_dir", str(root / "interrupted")])
    finally:
        script.SemaskTrainer = trainer
    return {"script": script, "options": options, "metrics": metrics, "root": root}


def assert_same_final_model(runs: dict, output_dir, metrics: dict) -> None:
    expected = load_file(runs["root"] / "full" / "model.safetensors")
    actual = load_file(output_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name in METRICS:
        assert metrics[name] == pytest.approx(runs["metrics"][name], abs=1e-6), name
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


def test_resumed_run_reaches_the_weights_and_metrics_of_an_uninterrupted_run(runs, tmp_path):
    interrupted = runs["root"] / "interrupted"
    assert sorted(path.name for path in interrupted.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (interrupted / "model.safetensors").exists()  # stopped before the end
    output_dir = tmp_path / "resumed"
    shutil.copytree(interrupted, output_dir)
    metrics = runs["script"].main(
        [*runs["options"], "--output_dir", str(output_dir), "--resume_from_checkpoint", "True"]
    )
    assert_same_final_model(runs, output_dir, metrics)


def test_corrupted_last_checkpoint_is_refused_and_the_earlier_one_resumes_exactly(runs, tmp_path, capsys):
    output_dir = tmp_path / "resumed"
    shutil.copytree(runs["root"] / "interrupted", output_dir)
    weights = output_dir / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    arguments = [*runs["options"], "--output_dir", str(output_dir)]
    for resume in ("True", str(output_dir / "checkpoint-4")):
        with pytest.raises(SystemExit) as exit_info:
            runs["script"].main([*arguments, "--resume_from_checkpoint", resume])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith(
            f"error: Cannot resume from {output_dir / 'checkpoint-4'}: model.safetensors is truncated"
        )
        assert f"pass --resume_from_checkpoint {output_dir / 'checkpoint-2'}" in error and "Traceback" not in error
    metrics = runs["script"].main([*arguments, "--resume_from_checkpoint", str(output_dir / "checkpoint-2")])
    assert_same_final_model(runs, output_dir, metrics)


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("file", "damage", "problem"),
    [
        ("optimizer.pt", truncate, "optimizer.pt is truncated or not a torch archive"),
        ("optimizer.pt", flip_a_byte, "optimizer.pt is corrupt (CRC check of "),
        ("rng_state.pth", truncate, "rng_state.pth is truncated or not a torch archive"),
        ("scheduler.pt", lambda path: path.unlink(), "scheduler.pt is missing"),
        ("trainer_state.json", lambda path: path.write_text("{"), "trainer_state.json cannot be read"),
        ("model.safetensors", lambda path: path.write_bytes(b""), "model.safetensors is truncated or corrupt"),
        ("model.safetensors", lambda path: path.unlink(), "it has no model weights"),
    ],
)
def test_damaged_checkpoint_files_are_named(runs, tmp_path, file, damage, problem):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs["root"] / "interrupted" / "checkpoint-2", checkpoint)
    assert checkpoint_problems(checkpoint) == []
    damage(checkpoint / file)
    problems = checkpoint_problems(checkpoint)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    with pytest.raises(CheckpointError, match=f"No earlier checkpoint in {tmp_path} is intact"):
        resolve_resume_checkpoint(str(checkpoint), tmp_path)
    with pytest.raises(CheckpointError, match=f"no checkpoint-<step> in {tmp_path / 'nothing'}"):
        resolve_resume_checkpoint("True", tmp_path / "nothing")


def test_resuming_mid_epoch_warns_that_augmentation_differs(runs, tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(runs["root"] / "interrupted" / "checkpoint-2", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3, "epoch": 1.5}))
    with caplog.at_level(logging.WARNING, logger="semask.training.trainer"):
        assert resolve_resume_checkpoint("True", tmp_path) == str(checkpoint)
    assert f"{checkpoint} was saved in the middle of epoch 2" in caplog.text and "--save_strategy epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semask.training.trainer"):
        resolve_resume_checkpoint(str(runs["root"] / "interrupted" / "checkpoint-2"), tmp_path)
    assert caplog.text == ""
