#!/usr/bin/env bash
# Runs every benchmark in bench/ in turn, with its default flags; each prints its markdown table and updates its
# section of BENCHMARKS.md. bench/train_step.py's default (--framework=both) runs ours and HF PyTorch alternated,
# each side in its own process. Add a line below only to run a benchmark again with other flags.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
for script in bench/*.py; do
  echo "=== ${script}" >&2
  "${PYTHON}" "${script}"
done
