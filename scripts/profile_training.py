#!/usr/bin/env python
"""Where a training step's time goes: forward and backward time per part of SeMask-FPN (or its plain Swin-FPN) and
the operators that take the most time, as Markdown. The decode head's part is its convolutions (scale heads and
classifier); its sums, upsampling and the semantic branch count as forward glue.

    .venv/bin/python scripts/profile_training.py --models semask swin-fpn --threads 2 --keep-freed-memory

Each part's forward time runs from its forward pre-hook to its forward hook; its backward time from its backward
pre-hook (the gradient of its output is ready) to its backward hook (the gradients of its inputs are ready), which
is approximate where autograd interleaves neighbouring parts. The losses' backward is the time from the start of
`loss.backward()` to the decode head's first backward pre-hook (the classifier's); the patch embedding's backward is
what `loss.backward()` takes besides the other parts' backward. The optimiser step (AdamW) is timed on its own.
Times are medians over the profiled steps, after warm-up steps; minor page faults are counted per step. The operator
table comes from `torch.profiler` over one further step (self CPU time, forward and backward together).
"""

import argparse
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import Case, build_model  # noqa: E402  (the benchmark's models, from this folder)

from semask.allocator import keep_freed_memory  # noqa: E402

NUM_LABELS = 150


class PartTimer:
    """Forward and backward wall-clock time of named groups of modules, accumulated per step."""

    def __init__(self, parts: dict[str, list[nn.Module]]):
        self.forward, self.backward = defaultdict(float), defaultdict(float)
        self._starts: dict[tuple[str, int], float] = {}
        self.decode_head_backward_started: float | None = None
        for name, modules in parts.items():
            for module in modules:
                self._hook(name, module)

    def _hook(self, name: str, module: nn.Module) -> None:
        key = (name, id(module))

        def forward_start(*_):
            self._starts[key] = time.perf_counter()

        def forward_end(*_):
            self.forward[name] += time.perf_counter() - self._starts.pop(key)

        def backward_start(*_):
            self._starts[key] = time.perf_counter()
            if name == "decode head" and self.decode_head_backward_started is None:
                self.decode_head_backward_started = self._starts[key]

        def backward_end(*_):
            if key in self._starts:
                self.backward[name] += time.perf_counter() - self._starts.pop(key)

        module.register_forward_pre_hook(forward_start)
        module.register_forward_hook(forward_end)
        module.register_full_backward_pre_hook(backward_start)
        module.register_full_backward_hook(backward_end)

    def reset(self) -> None:
        self.forward.clear()
        self.backward.clear()
        self._starts.clear()
        self.decode_head_backward_started = None


def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The parts of a SeMask-FPN training step, in the order of the forward pass."""
    parts = {"patch embedding": [model.semask.embeddings]}
    for index, stage in enumerate(model.semask.encoder.layers, start=1):
        parts[f"stage {index} Swin blocks"] = list(stage.blocks)
        if stage.semantic_layer is not None:
            parts[f"stage {index} semantic layer"] = [stage.semantic_layer]
        if stage.downsample is not None:
            parts[f"stage {index} patch merging"] = [stage.downsample]
    parts["output norms"] = list(model.semask.hidden_states_norms.values())
    # the head's convolutions: hooks on the head itself would see no tensor inputs (it takes tuples of maps)
    parts["decode head"] = [*model.decode_head.scale_heads, model.decode_head.classifier]
    return parts


def timed_loss(model: nn.Module, name: str, times: dict[str, float]) -> None:
    """Wrap the model's loss method `name` so that its forward time adds to `times[name]`."""
    method = getattr(model, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        loss = method(*args, **kwargs)
        times[name] += time.perf_counter() - start
        return loss

    setattr(model, name, wrapper)


def profile(model_name: str, args: argparse.Namespace) -> str:
    case = Case(model_name, args.size, args.resolution, args.batch, "train", "sdpa", "fp32", False, False)
    torch.manual_seed(0)
    model = build_model(case).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixel_values = torch.randn(args.batch, 3, args.resolution, args.resolution)
    labels = torch.randint(0, NUM_LABELS, (args.batch, args.resolution, args.resolution))
    timer = PartTimer(model_parts(model))
    loss_times = defaultdict(float)
    for name in ("decode_loss", "semantic_loss"):
        timed_loss(model, name, loss_times)

    def step() -> dict[str, float]:
        timer.reset()
        loss_times.clear()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        loss = model(pixel_values, labels=labels).loss
        backward_start = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        row = {f"{name} forward": value for name, value in timer.forward.items()}
        row |= {f"{name} backward": value for name, value in timer.backward.items()}
        row |= {f"losses ({name}) forward": value for name, value in loss_times.items()}
        row["losses backward"] = (timer.decode_head_backward_started or backward_end) - backward_start
        row["patch embedding backward"] = (
            backward_end
            - backward_start
            - sum(
                value for key, value in row.items() if key.endswith(" backward") and key != "patch embedding backward"
            )
        )
        row["optimiser step"] = end - backward_end
        row["step"] = end - start
        row["minor page faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return row

    for _ in range(args.warmup):
        step()
    rows = [step() for _ in range(args.steps)]
    medians = {key: statistics.median(row.get(key, 0.0) for row in rows) for key in rows[0]}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    operators = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.operators)
    return format_report(model_name, case, medians, operators)


def format_report(model_name: str, case: Case, medians: dict[str, float], operators: str) -> str:
    total = medians["step"]
    lines = [
        f"### {model_name} ({case.size}, {case.resolution} x {case.resolution}, batch {case.batch}, fp32)",
        "",
        f"Step: {total:.3f} s (median), {medians['minor page faults']:,.0f} minor page faults.",
        "",
        "| part | seconds | share of the step |",
        "|---|---|---|",
    ]
    for key, value in medians.items():
        if key not in ("step", "minor page faults"):
            lines.append(f"| {key} | {value:.3f} | {100 * value / total:.1f} % |")
    accounted = sum(value for key, value in medians.items() if key not in ("step", "minor page faults"))
    rest = total - accounted
    lines.append(f"| outside the parts (forward glue, the loss sum) | {rest:.3f} | {100 * rest / total:.1f} % |")
    lines += ["", "Operators (one profiled step, self CPU time):", "", "```", operators.strip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("semask", "swin-fpn"), default=["semask", "swin-fpn"])
    parser.add_argument("--size", choices=("tiny", "small", "base", "large"), default="tiny")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--operators", type=int, default=15, help="rows of the operator table")
    parser.add_argument("--keep-freed-memory", action="store_true", help="semask.allocator.keep_freed_memory()")
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    header = (
        f"Command: `python scripts/profile_training.py {' '.join(sys.argv[1:])}`\n\n"
        f"torch {torch.__version__}, {args.threads} threads, keep_freed_memory {args.keep_freed_memory}.\n\n"
    )
    report = header + "\n".join(profile(model_name, args) for model_name in args.models)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)


if __name__ == "__main__":
    main()
