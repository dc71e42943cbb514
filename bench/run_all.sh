#!/usr/bin/env bash
# Runs every benchmark in bench/ in turn, with its default flags; each prints its markdown table and updates its
# section of BENCHMARKS.md. Add a line below only to run a benchmark again with other flags.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
for script in bench/*.py; do
  echo "=== ${script}" >&2
  "${PYTHON}" "${script}"
done
