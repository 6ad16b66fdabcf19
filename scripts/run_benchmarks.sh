#!/usr/bin/env bash
# Regenerate the tables of docs/benchmarks.md (about 50 minutes on 2 CPU cores; run on a quiet machine).
# Each command writes one Markdown table (with its command line and GEMM rate) under docs/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
run() { .venv/bin/python scripts/benchmark.py --threads "${THREADS:-2}" "$@"; }
mkdir -p docs/benchmarks
# SeMask-T against its plain Swin-FPN, UperNet+Swin-T and Segformer-B2, at a small size and the crop size.
run --sizes tiny --resolutions 256 512 --attention sdpa eager --runs 5 --warmup 2 --markdown docs/benchmarks/inference-tiny.md
# The semantic layers' overhead: SeMask-T against its plain Swin-T FPN, the cases taking turns over 5 rounds.
run --sizes tiny --models semask swin-fpn --attention sdpa eager --reference swin-fpn --runs 5 --warmup 1 --rounds 5 \
  --markdown docs/benchmarks/overhead-tiny.md
# A larger batch.
run --sizes tiny --batch-sizes 4 --models semask swin-fpn --attention sdpa eager --runs 3 --warmup 1 --rounds 3 \
  --markdown docs/benchmarks/inference-tiny-batch4.md
# The larger presets at their crop sizes.
run --sizes small base large --models semask swin-fpn --attention sdpa eager --runs 2 --warmup 1 --rounds 3 \
  --markdown docs/benchmarks/inference-presets.md
# bf16 autocast and torch.compile.
run --sizes tiny --models semask swin-fpn --dtypes fp32 bf16 --compile off on --runs 5 --warmup 2 \
  --markdown docs/benchmarks/inference-bf16-compile.md
# A training step (forward, backward, AdamW) at batch 2, with and without activation checkpointing.
run --sizes tiny --tasks train --batch-sizes 2 --models semask swin-fpn --checkpointing off on --runs 2 --warmup 1 \
  --markdown docs/benchmarks/train-tiny.md
run --sizes tiny --tasks train --batch-sizes 2 --models semask --compile off on --runs 2 --warmup 1 \
  --markdown docs/benchmarks/train-tiny-compile.md
