"""scripts/benchmark.py: FLOP counts that do not depend on the kernels that run, and a small run end to end."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import semask.fused_kernels as fused_kernels
from conftest import load_script, tiny_config_kwargs
from semask import SemaskConfig, SemaskForSemanticSegmentation

benchmark = load_script("benchmark")


def counted_flops(model, pixel_values) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=benchmark.EXTRA_FLOP_FORMULAS)
    with torch.inference_mode(), counter:
        model(pixel_values)
    return counter.get_total_flops()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_flops_are_counted_alike_on_fused_kernels_and_plain_layers(monkeypatch, attention):
    model = SemaskForSemanticSegmentation(SemaskConfig(**tiny_config_kwargs())).eval()
    model.set_attn_implementation(attention)
    pixel_values = torch.randn(1, 3, 64, 64)
    fused = counted_flops(model, pixel_values)
    monkeypatch.setattr(fused_kernels, "onednn_applies", lambda *args: False)
    plain = counted_flops(model, pixel_values)
    assert fused == plain > 0


def test_benchmark_writes_json_and_markdown(tmp_path):
    json_path, markdown_path = tmp_path / "rows.json", tmp_path / "table.md"
    benchmark.main(
        ["--models", "semask", "swin-fpn", "--reference", "swin-fpn", "--resolutions", "64", "--warmup", "0",
         "--runs", "1", "--threads", str(torch.get_num_threads()),  # (main sets it for the whole process)
         "--json", str(json_path), "--markdown", str(markdown_path)]
    )  # fmt: skip
    rows = json.loads(json_path.read_text())["rows"]
    assert [row["model"] for row in rows] == ["semask", "swin-fpn"]
    semask, plain = rows
    assert semask["gflops"] > plain["gflops"] > 0 and semask["median_s"] > 0
    assert plain["time_ratio"] == 1.0 and semask["time_ratio"] == pytest.approx(semask["median_s"] / plain["median_s"])
    assert 0 < semask["percent_of_gemm"] < 200
    table = markdown_path.read_text()
    assert table.startswith("Command: `python scripts/benchmark.py") and "| semask |" in table
