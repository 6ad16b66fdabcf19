#!/usr/bin/env bash
# The test command: set up .venv, lint, then run the test suite on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: the suite is missing or mis-configured." >&2
  exit 1
fi
exit "$status"
