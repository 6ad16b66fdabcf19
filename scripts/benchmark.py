"""Speed, memory and FLOPs of SeMask-FPN against its plain Swin-FPN baseline, UperNet+Swin and Segformer, and of
SeMask-MiT against Segformer, in one run.

    .venv/bin/python scripts/benchmark.py --sizes tiny --resolutions 512 --threads 2 --markdown results.md
    .venv/bin/python scripts/benchmark.py --device cuda --tasks train --batch-sizes 8 --models semask swin-fpn \\
        --dtypes fp32 bf16 --compile off on --checkpointing off on --markdown train-gpu.md
    .venv/bin/python scripts/benchmark.py --models semask-mit segformer --reference segformer --markdown mit.md

Every case runs in its own subprocess (so peak memory is the case's own) with random weights: latency (median,
min, max over warm runs), throughput, peak memory, FLOPs (torch.utils.flop_counter) and the achieved GFLOP/s
against a GEMM rate measured on the spot (on the case's device, in its process, after its timed runs), for
inference or a training step (forward + backward + AdamW step).
Ratios compare each case's median time with the reference model's in the same setting. With `--rounds N` the
cases take turns N times (A B A B ...) and the statistics cover all their runs: the machine's speed drifts by
several percent over minutes, which would otherwise land on whichever case runs at the time. Compiled inference
uses inductor's freezing (`torch._inductor.config.freezing = True`). FLOPs include oneDNN's fused linear kernel
(semask's CPU inference path) and SDPA's CPU flash kernel, which FlopCounterMode has no formula for.

Peak memory: `peak_mb` is the most tensor memory alive during one step, as `torch.cuda.max_memory_allocated` on
GPUs; on CPUs it is the bytes of the tensors alive before the step (weights, gradients, optimiser state, inputs)
plus the highest running total of the step's allocations recorded by the PyTorch profiler. `rss_mb` is the growth
of the process's peak resident memory, which also counts the allocator's fragmentation.
"""

import argparse
import functools
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_flop_count
from transformers import (
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from semask import SemaskConfig, SemaskForSemanticSegmentation, SemaskMitConfig, SemaskMitForSemanticSegmentation
from semask.allocator import keep_freed_memory
from semask.presets import SWIN_SIZES

MODELS = ("semask", "swin-fpn", "upernet-swin", "segformer", "semask-mit")
CROP_SIZES = {"tiny": 512, "small": 512, "base": 512, "large": 640}
# Segformer variants of comparable size: B2 ~ Swin-T, B3 ~ Swin-S, B4 ~ Swin-B, B5 ~ Swin-L.
SEGFORMER_SIZES = {
    "tiny": {"depths": (3, 4, 6, 3)},
    "small": {"depths": (3, 4, 18, 3)},
    "base": {"depths": (3, 8, 27, 3)},
    "large": {"depths": (3, 6, 40, 3)},
}
SEGFORMER_WIDE = {"hidden_sizes": (64, 128, 320, 512), "decoder_hidden_size": 768, "num_attention_heads": (1, 2, 5, 8)}
NUM_LABELS = 150


@dataclass(frozen=True)
class Case:
    model: str
    size: str
    resolution: int
    batch: int
    task: str  # "inference" or "train"
    attention: str  # "sdpa" or "eager"
    dtype: str  # "fp32" or "bf16" (autocast)
    compile: bool
    checkpointing: bool
    device: str = "cpu"  # "cpu" or "cuda"


def build_model(case: Case) -> torch.nn.Module:
    """A randomly initialised model for `case` with 150 classes."""
    if case.model in ("semask", "swin-fpn"):
        overrides = {"num_semantic_blocks": (0, 0, 0, 0)} if case.model == "swin-fpn" else {}
        config = SemaskConfig.from_preset(f"semask-{case.size}-fpn-ade20k", **overrides)
        return SemaskForSemanticSegmentation._from_config(config, attn_implementation=case.attention)
    if case.model == "upernet-swin":
        stages = ["stage1", "stage2", "stage3", "stage4"]
        backbone = SwinConfig(**SWIN_SIZES[case.size], out_features=stages, drop_path_rate=0.3)
        config = UperNetConfig(backbone_config=backbone, num_labels=NUM_LABELS, use_auxiliary_head=case.task == "train")
        return UperNetForSemanticSegmentation._from_config(config, attn_implementation=case.attention)
    if case.model == "segformer":
        config = SegformerConfig(**SEGFORMER_WIDE, **SEGFORMER_SIZES[case.size], num_labels=NUM_LABELS)
        return SegformerForSemanticSegmentation._from_config(config, attn_implementation=case.attention)
    if case.model == "semask-mit":  # SegFormer's encoder and MLP head with one semantic block per stage
        config = SemaskMitConfig(**SEGFORMER_WIDE, **SEGFORMER_SIZES[case.size], num_labels=NUM_LABELS)
        return SemaskMitForSemanticSegmentation._from_config(config, attn_implementation=case.attention)
    raise ValueError(f"Unknown model {case.model!r}; expected one of {MODELS}.")


def _onednn_linear_flop(input_shape, *args, out_shape, **kwargs) -> int:
    return 2 * torch.Size(out_shape).numel() * input_shape[-1]


def _onednn_convolution_flop(input_shape, *args, out_shape, **kwargs) -> int:
    # the binary overload takes the tensor it adds before the weight; the default one takes the bias (1-D) after it
    weight_shape = args[1] if args[1] is not None and len(args[1]) == len(input_shape) else args[0]
    return conv_flop_count(input_shape, weight_shape, out_shape)


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# kernels FlopCounterMode has no formula for: oneDNN's fused linear and convolution (semask's CPU inference path,
# both overloads) and SDPA's CPU flash kernel
EXTRA_FLOP_FORMULAS = {
    torch.ops.mkldnn._linear_pointwise: _onednn_linear_flop,
    torch.ops.mkldnn._convolution_pointwise: _onednn_convolution_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
}


def resolve_device(device: str) -> str:
    """The device the cases run on: `device`, or for "auto" the GPU where there is one, else the CPU; an error
    naming the problem for "cuda" without a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA GPU is available to this process (torch.cuda.is_available() is False)."
        )
    return device


@functools.cache
def gemm_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """The best rate (GFLOP/s) of a `size` x `size` matrix multiply on `device` in `dtype` over `repeats` timings,
    measured on the first call and cached per (device, dtype, size) for the process."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    product = torch.empty_like(a)
    calls = 50 if torch.device(device).type == "cuda" else 1  # one call is too short to time alone on a GPU

    def step() -> None:
        for _ in range(calls):
            torch.matmul(a, b, out=product)

    step()
    best = min(_timed(step, device) for _ in range(repeats))
    return calls * 2 * size**3 / best / 1e9


def device_name(device: str) -> str:
    """The device as the table header names it, e.g. "cuda (NVIDIA H200)" or "cpu"."""
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"


def _timed(step, device: str) -> float:
    """The seconds `step()` takes, including the work it queues on a CUDA `device`."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


def cpu_peak_tensor_mb(step, live_before: int) -> float:
    """The most CPU tensor memory alive during `step()`: `live_before` bytes plus the peak of its allocations."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        step()
    events = sorted(
        (event for event in profile.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return (live_before + peak) / 2**20


def run_case(case: Case, warmup: int, runs: int) -> dict:
    """Measure one case in this process: FLOPs, latencies and peak memory."""
    torch.manual_seed(0)
    device = case.device
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build_model(case).to(device)
    if case.checkpointing:
        model.activation_checkpointing_enable()
    model.train(case.task == "train")
    pixel_values = torch.randn(case.batch, 3, case.resolution, case.resolution, device=device)
    labels = torch.randint(0, NUM_LABELS, (case.batch, case.resolution, case.resolution), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if case.task == "train" else None
    if case.compile and case.task == "inference":
        # PyTorch's recommended CPU inference setting: weights folded into the graph as constants (prepacked GEMM
        # and convolution weights, batch norms folded into the convolutions)
        torch._inductor.config.freezing = True
    forward = torch.compile(model) if case.compile else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=case.dtype == "bf16")

    def step() -> None:
        if optimizer is None:
            with torch.inference_mode(), autocast:
                outputs = forward(pixel_values=pixel_values)
            if not torch.isfinite(outputs.logits).all():
                raise FloatingPointError(f"non-finite logits in {case}")
            return
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = forward(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in {case}")

    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    first_call = _timed(step, device)  # includes compilation when compiling
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [_timed(step, device) for _ in range(runs)]
    # the GEMM rate on the case's device under the same conditions as the timed runs (the machine's speed drifts
    # between cases)
    gemm = gemm_gflops(device, torch.bfloat16 if case.dtype == "bf16" else torch.float32)
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        state = [value for values in (optimizer.state.values() if optimizer else ()) for value in values.values()]
        live = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), *state, pixel_values]
        peak_mb = cpu_peak_tensor_mb(step, tensor_bytes(live) + (tensor_bytes([labels]) if optimizer else 0))
    return {
        "gflops": counter.get_total_flops() / 1e9,
        "first_call_s": first_call,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_mb": peak_mb,
        "rss_mb": rss_mb,
        "gemm_gflop_per_s": gemm,
        "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def run_in_subprocess(case: Case, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps(asdict(case))]
    command += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    command += ["--keep-freed-memory"] if args.keep_freed_memory else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def merge_rounds(results: list[dict]) -> dict:
    """One case's results from several rounds: statistics over all timed runs, the highest memory peaks, the
    median GEMM rate, and the first round's first call."""
    if any("error" in result for result in results):
        return next(result for result in results if "error" in result)
    times = [time for result in results for time in result["times_s"]]
    return {
        **results[0],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "peak_mb": max(result["peak_mb"] for result in results),
        "rss_mb": max(result["rss_mb"] for result in results),
        "gemm_gflop_per_s": statistics.median(result["gemm_gflop_per_s"] for result in results),
    }


def cases_from_args(args: argparse.Namespace) -> list[Case]:
    cases = []
    for size, resolution, task, batch, model, attention, dtype, compiled, checkpointing in itertools.product(
        args.sizes,
        args.resolutions,
        args.tasks,
        args.batch_sizes,
        args.models,
        args.attention,
        args.dtypes,
        args.compile,
        args.checkpointing,
    ):
        if checkpointing and task != "train":
            continue
        if model == "upernet-swin":
            # transformers' Swin supports SDPA, but its UperNetForSemanticSegmentation does not: UperNetPreTrainedModel
            # leaves `_supports_sdpa` at False, so attn_implementation="sdpa" raises a ValueError
            attention = "eager"
        resolution = CROP_SIZES[size] if resolution == "crop" else int(resolution)
        case = Case(model, size, resolution, batch, task, attention, dtype, compiled, checkpointing, args.device)
        if case not in cases:
            cases.append(case)
    return cases


def add_ratios(rows: list[dict], reference: str) -> None:
    """Each row's time relative to the reference model's in the same setting, and its share of its GEMM rate."""
    setting_keys = ("size", "resolution", "batch", "task", "attention", "dtype", "compile", "checkpointing")
    references = {tuple(r[k] for k in setting_keys): r for r in rows if r["model"] == reference and "median_s" in r}
    for row in rows:
        if "median_s" not in row:
            continue
        row["images_per_s"] = row["batch"] / row["median_s"]
        row["gflop_per_s"] = row["gflops"] / row["median_s"]
        row["percent_of_gemm"] = 100 * row["gflop_per_s"] / row["gemm_gflop_per_s"]
        reference_row = references.get(tuple(row[k] for k in setting_keys))
        row["time_ratio"] = row["median_s"] / reference_row["median_s"] if reference_row else None


COLUMNS = (
    ("model", "{}"),
    ("size", "{}"),
    ("resolution", "{}"),
    ("batch", "{}"),
    ("task", "{}"),
    ("attention", "{}"),
    ("dtype", "{}"),
    ("compile", "{}"),
    ("checkpointing", "{}"),
    ("gflops", "{:.1f}"),
    ("median_s", "{:.3f}"),
    ("min_s", "{:.3f}"),
    ("max_s", "{:.3f}"),
    ("images_per_s", "{:.2f}"),
    ("gflop_per_s", "{:.1f}"),
    ("gemm_gflop_per_s", "{:.0f}"),
    ("percent_of_gemm", "{:.0f}"),
    ("peak_mb", "{:.0f}"),
    ("rss_mb", "{:.0f}"),
    ("time_ratio", "{:.2f}"),
    ("first_call_s", "{:.1f}"),
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            cells = [str(row[name]) for name, _ in COLUMNS[:9]] + [f"error: {row['error']}"]
        else:
            cells = ["-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--reference", choices=MODELS, default="semask", help="model the time ratios refer to")
    parser.add_argument("--sizes", nargs="+", choices=list(CROP_SIZES), default=["tiny"])
    parser.add_argument("--resolutions", nargs="+", default=["crop"], help="square sides, or 'crop' (the size's)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--tasks", nargs="+", choices=("inference", "train"), default=["inference"])
    parser.add_argument("--attention", nargs="+", choices=("sdpa", "eager"), default=["sdpa"])
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--compile", nargs="+", type=lambda v: v == "on", default=[False], help="off and/or on")
    parser.add_argument("--checkpointing", nargs="+", type=lambda v: v == "on", default=[False], help="off / on")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the cases run (auto: the GPU if any)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse in every case (semask.allocator.keep_freed_memory): no page faults "
        "from large activations mapped afresh each step",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all cases this many times in turn; statistics cover all runs"
    )
    parser.add_argument("--json", type=Path, help="write all rows as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.case:
        print(json.dumps(run_case(Case(**json.loads(args.case)), args.warmup, args.runs)))
        return
    args.device = device = resolve_device(args.device)
    peaks = {"fp32": gemm_gflops(device, torch.float32)}
    if "bf16" in args.dtypes:
        peaks["bf16"] = gemm_gflops(device, torch.bfloat16)
    print("GEMM rate at the start (2048x2048 matmul): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))
    cases = cases_from_args(args)
    results = {case: [] for case in cases}
    for _ in range(args.rounds):  # the cases take turns, so that the machine's drift reaches them all alike
        for case in cases:
            results[case].append(run_in_subprocess(case, args))
            print(json.dumps({**asdict(case), **results[case][-1]}), flush=True)
    rows = [{**asdict(case), **merge_rounds(results[case])} for case in cases]
    add_ratios(rows, args.reference)
    table = markdown_table(rows)
    print(table)
    command = "python scripts/benchmark.py " + " ".join(sys.argv[1:])
    header = (
        f"Command: `{command}`\n\ntorch {torch.__version__}, {device_name(device)}, {args.threads} threads, "
        + ("freed memory kept for reuse, " if args.keep_freed_memory else "")
        + "GEMM rate at the start "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())
        + "; percent_of_gemm uses the GEMM rate measured in each case's process after its timed runs"
        + f" (gemm_gflop_per_s); time_ratio = median time / {args.reference}'s in the same setting.\n\n"
    )
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(header + table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
