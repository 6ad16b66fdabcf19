#!/usr/bin/env bash
# The main job: set up .venv, then fine-tune a tiny SeMask on the built-in demo dataset on the CPU (a few minutes).
# The output folder (default: outputs/semask-demo-<time>) gets the model, processor, model card, eval_results.json,
# training_curves.png and prediction overlays. Extra arguments go to scripts/train_semask.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
output_dir="outputs/semask-demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python scripts/train_semask.py --dataset_name demo --output_dir "$output_dir" "$@"
echo "Model folder: $output_dir"
