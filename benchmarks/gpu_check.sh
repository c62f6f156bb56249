#!/usr/bin/env bash
# One-device numerics and speed check (benchmarks/gpu_check.py): on one GPU it must finish in
# under 8 minutes; `--quick` runs the same code paths at small shapes anywhere (CPU).
#   benchmarks/gpu_check.sh [--quick] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [[ ! -x "$python" ]]; then python=python3; fi
exec timeout 470 "$python" benchmarks/gpu_check.py "$@"
