"""scripts/benchmark.py: FLOP formulas against the plain ops, the derived columns from known inputs, the GEMM rate's
device and timing, and a real run end to end."""

import dataclasses
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_script, tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation

benchmark = load_script("benchmark")
mkldnn = torch.ops.mkldnn


def counted_flops(step, custom_mapping=benchmark.EXTRA_FLOP_FORMULAS) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=custom_mapping)
    with torch.inference_mode(), counter:
        step()
    return counter.get_total_flops()


def fused_and_plain_ops() -> dict:
    """For each kernel of `EXTRA_FLOP_FORMULAS`: a call of it and the same function in ops FlopCounterMode knows."""
    x, residual, weight, bias = torch.randn(2, 5, 12), torch.randn(2, 5, 7), torch.randn(7, 12), torch.randn(7)
    image, conv_weight, conv_bias = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6)
    conv = {"padding": [1, 1], "stride": [2, 2], "dilation": [1, 1], "groups": 1}
    added = torch.randn(2, 6, 5, 5)
    query, key, value = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    return {
        "linear": (
            lambda: mkldnn._linear_pointwise.default(x, weight, bias, "none", [], ""),
            lambda: F.linear(x, weight, bias),
        ),
        "linear-add": (
            lambda: mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add"),
            lambda: residual + F.linear(x, weight, bias),
        ),
        "conv": (
            lambda: mkldnn._convolution_pointwise.default(
                image, conv_weight, conv_bias, *conv.values(), "none", [], ""
            ),
            lambda: F.conv2d(image, conv_weight, conv_bias, **conv),
        ),
        "conv-add": (
            lambda: mkldnn._convolution_pointwise.binary(
                image, added, conv_weight, conv_bias, *conv.values(), "add", None, None, [], None
            ),
            lambda: added + F.conv2d(image, conv_weight, conv_bias, **conv),
        ),
        "cpu-flash-attention": (
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)[0],
            lambda: (query @ key.transpose(-1, -2) * 8**-0.5).softmax(-1) @ value,
        ),
    }


@pytest.mark.parametrize("kernel", list(fused_and_plain_ops()))
def test_extra_flop_formulas_count_what_the_plain_ops_count(kernel):
    fused, plain = fused_and_plain_ops()[kernel]
    torch.testing.assert_close(fused(), plain(), rtol=1e-4, atol=1e-5)  # the same function, so the same FLOPs
    assert counted_flops(fused) == counted_flops(plain, custom_mapping={}) > 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_model_flops_are_the_same_on_the_cpu_inference_path_and_the_autograd_path(attention):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    model.set_attn_implementation(attention)
    pixel_values = torch.randn(1, 3, 64, 64)
    inference = counted_flops(lambda: model(pixel_values))  # oneDNN kernels, in-place sums, batched window attention
    counter = FlopCounterMode(display=False, custom_mapping=benchmark.EXTRA_FLOP_FORMULAS)
    with counter:  # weights that need gradients: the plain layers
        model(pixel_values)
    assert inference == counter.get_total_flops() > 0


def result_row(model: str, attention: str, median_s: float, resolution: int = 64, **fields) -> dict:
    """A measured row at batch 2; its setting differs from other rows' only in attention and resolution."""
    setting = {"size": "tiny", "resolution": resolution, "batch": 2, "task": "inference", "attention": attention}
    setting |= {"dtype": "fp32", "compile": False, "checkpointing": False}
    return {"model": model, **setting, "median_s": median_s, "gflops": 10.0, "gemm_gflop_per_s": 100.0, **fields}


def test_add_ratios_divides_by_the_reference_in_the_same_setting():
    rows = [
        result_row("semask", "sdpa", 0.5),
        result_row("swin-fpn", "sdpa", 0.75, gflops=12.0, gemm_gflop_per_s=160.0),
        result_row("semask", "eager", 0.8),
        result_row("swin-fpn", "eager", 0.4),
        result_row("swin-fpn", "sdpa", 1.0, resolution=128),  # no reference row in its setting
        {key: value for key, value in result_row("semask", "sdpa", 0.0, resolution=256).items() if key != "median_s"}
        | {"error": "out of memory"},
    ]
    benchmark.add_ratios(rows, "semask")
    assert [row.get("time_ratio") for row in rows] == pytest.approx([1.0, 1.5, 1.0, 0.5, None, None])
    other = rows[1]
    assert other["images_per_s"] == pytest.approx(2 / 0.75)
    assert other["gflop_per_s"] == pytest.approx(12.0 / 0.75)
    assert other["percent_of_gemm"] == pytest.approx(100 * 16.0 / 160.0)
    assert rows[3]["percent_of_gemm"] == pytest.approx(100 * 25.0 / 100.0)
    assert "percent_of_gemm" not in rows[5]


def test_merge_rounds_pools_the_runs_of_all_rounds():
    rounds = [
        {"times_s": [3.0, 1.0], "first_call_s": 9.0, "peak_mb": 10.0, "rss_mb": 30.0, "gemm_gflop_per_s": 100.0},
        {"times_s": [2.0, 5.0], "first_call_s": 1.0, "peak_mb": 20.0, "rss_mb": 5.0, "gemm_gflop_per_s": 300.0},
        {"times_s": [4.0], "first_call_s": 1.0, "peak_mb": 15.0, "rss_mb": 5.0, "gemm_gflop_per_s": 120.0},
    ]
    merged = benchmark.merge_rounds(rounds)
    assert merged["times_s"] == [3.0, 1.0, 2.0, 5.0, 4.0]
    assert (merged["median_s"], merged["min_s"], merged["max_s"]) == (3.0, 1.0, 5.0)
    assert (merged["peak_mb"], merged["rss_mb"], merged["gemm_gflop_per_s"]) == (20.0, 30.0, 120.0)
    assert merged["first_call_s"] == 9.0
    assert benchmark.merge_rounds([rounds[0], {"error": "failed"}]) == {"error": "failed"}


class RecordMatmuls(TorchDispatchMode):
    """Records the device and dtype of every matrix multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket is torch.ops.aten.mm:
            self.calls.append((args[0].device.type, args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_gemm_rate_is_measured_on_the_given_device_and_cached(monkeypatch):
    times = iter([0.5, 0.25, 1.0])

    def timed(step, device: str) -> float:
        assert device == "meta"
        step()
        return next(times)

    monkeypatch.setattr(benchmark, "_timed", timed)
    benchmark.gemm_gflops.cache_clear()
    with RecordMatmuls() as recorder:
        rate = benchmark.gemm_gflops("meta", torch.bfloat16, size=64, repeats=3)
        again = benchmark.gemm_gflops("meta", torch.bfloat16, size=64, repeats=3)
    assert recorder.calls == [("meta", torch.bfloat16)] * 4  # a warm-up call, then the 3 timed ones; then cached
    assert rate == again == pytest.approx(2 * 64**3 / 0.25 / 1e9)  # the best timing


def test_timings_wait_for_the_gpu_on_cuda_only(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("synchronize", device)))
    benchmark._timed(lambda: events.append("step"), "cuda")
    benchmark._timed(lambda: events.append("step"), "cpu")
    assert events == [("synchronize", "cuda"), "step", ("synchronize", "cuda"), "step"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_run_case_measures_the_gemm_rate_on_the_case_device_in_its_dtype(monkeypatch, dtype):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs()))
    input_devices = set()
    model.register_forward_pre_hook(
        lambda module, args, kwargs: input_devices.add(kwargs["pixel_values"].device.type), with_kwargs=True
    )
    gemm_calls = []
    monkeypatch.setattr(benchmark, "build_model", lambda case: model)
    monkeypatch.setattr(benchmark, "gemm_gflops", lambda device, dtype: gemm_calls.append((device, dtype)) or 123.0)
    case = benchmark.Case("semask", "tiny", 64, 1, "inference", "sdpa", dtype, False, False)
    result = benchmark.run_case(case, warmup=0, runs=2)
    assert len(input_devices) == 1
    assert gemm_calls == [(input_devices.pop(), torch.bfloat16 if dtype == "bf16" else torch.float32)]
    assert result["gemm_gflop_per_s"] == 123.0
    assert len(result["times_s"]) == 2 and result["median_s"] == statistics.median(result["times_s"])


def test_main_takes_turns_over_rounds_and_tabulates_the_merged_rows(monkeypatch, tmp_path):
    order = []

    def run_in_subprocess(case, args) -> dict:
        order.append(case.model)
        median = {"semask": 0.5, "swin-fpn": 0.25}[case.model]
        return {"gflops": 20.0, "first_call_s": 1.0, "median_s": median, "min_s": median, "max_s": median,
                "times_s": [median], "peak_mb": 50.0, "rss_mb": 60.0, "gemm_gflop_per_s": 160.0,
                "parameters_m": 1.0}  # fmt: skip

    monkeypatch.setattr(benchmark, "run_in_subprocess", run_in_subprocess)
    monkeypatch.setattr(benchmark, "gemm_gflops", lambda device, dtype: 200.0)
    json_path, markdown_path = tmp_path / "rows.json", tmp_path / "table.md"
    benchmark.main(
        ["--models", "semask", "swin-fpn", "--resolutions", "64", "--rounds", "2", "--threads",
         str(torch.get_num_threads()), "--json", str(json_path), "--markdown", str(markdown_path)]
    )  # fmt: skip
    assert order == ["semask", "swin-fpn", "semask", "swin-fpn"]
    written = json.loads(json_path.read_text())
    assert written["peaks"] == {"fp32": 200.0}
    semask, plain = written["rows"]
    assert (semask["times_s"], plain["time_ratio"], plain["percent_of_gemm"]) == ([0.5, 0.5], 0.5, 50.0)
    table = markdown_path.read_text()
    assert "| swin-fpn | tiny | 64 | 1 | inference | sdpa | fp32 | False | False | 20.0 | 0.250 |" in table
    assert table.splitlines()[-1].endswith("| 160 | 50 | 50 | 60 | 0.50 | 1.0 |")


def test_benchmark_runs_a_case_in_a_subprocess_end_to_end(tmp_path):
    json_path, markdown_path = tmp_path / "rows.json", tmp_path / "table.md"
    benchmark.main(
        ["--models", "swin-fpn", "--reference", "swin-fpn", "--resolutions", "64", "--warmup", "0", "--runs", "1",
         "--threads", str(torch.get_num_threads()),  # (main sets it for the whole process)
         "--json", str(json_path), "--markdown", str(markdown_path)]
    )  # fmt: skip
    (row,) = json.loads(json_path.read_text())["rows"]
    case = benchmark.Case(**{key: row[key] for key in benchmark.Case.__dataclass_fields__})
    model = benchmark.build_model(case).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    assert row["gflops"] == pytest.approx(counted_flops(lambda: model(pixel_values=pixel_values)) / 1e9)
    assert row["times_s"] == [row["median_s"]] and row["gemm_gflop_per_s"] > 0
    assert row["percent_of_gemm"] == pytest.approx(100 * row["gflops"] / row["median_s"] / row["gemm_gflop_per_s"])
    table = markdown_path.read_text()
    assert table.startswith("Command: `python scripts/benchmark.py") and "| swin-fpn | tiny | 64 |" in table


def test_device_choice_and_a_clear_refusal_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert benchmark.resolve_device("auto") == "cpu" and benchmark.resolve_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is available"):
        benchmark.resolve_device("cuda")
    args = benchmark.parse_args(["--device", "cpu", "--tasks", "train", "--models", "semask", "swin-fpn"])
    assert {case.device for case in benchmark.cases_from_args(args)} == {"cpu"}


def test_semask_mit_rows_compare_with_segformer_on_the_same_encoder():
    """`semask-mit` is `segformer` of the same size plus one semantic block per stage (weights of the same names)."""
    case = benchmark.Case("segformer", "tiny", 64, 1, "train", "sdpa", "fp32", False, False)
    segformer = benchmark.build_model(case)
    semask_mit = benchmark.build_model(dataclasses.replace(case, model="semask-mit"))
    shapes = {name: tensor.shape for name, tensor in semask_mit.state_dict().items() if ".semantic_layer." not in name}
    assert shapes == {name: tensor.shape for name, tensor in segformer.state_dict().items()}
    assert semask_mit.config.semantic_attention == ("windowed", "windowed", "global", "global")
