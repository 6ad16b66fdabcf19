#!/usr/bin/env bash
# The main job: set up .venv, then segment a generated image with a randomly initialised SeMask-T preset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/quickstart.py "$@"
