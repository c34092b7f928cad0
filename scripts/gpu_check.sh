#!/usr/bin/env bash
# The GPU check (issue 25): one command that, on a CUDA machine, proves or disproves the plugin's
# CUDA, fp16/bf16 and NCCL paths in under 8 minutes on one GPU, and on a machine without CUDA runs
# what emulates on CPU, says what it skipped, and exits 0 when all that ran passed.
#
#   scripts/gpu_check.sh [--out DIR] [--cpu-only] [--only CHECK,...] [--updates N] [--list] [--help]
#   make gpu-check [GPU_CHECK_ARGS="..."]
#
# One line per check and a summary on stdout, the same in DIR/gpu_check.json (default
# runs/gpu_check), each check's output in DIR/<check>.log. Exit status 1 if a check failed.
# The checks and their tolerances: scripts/gpu_check.py's docstring and docs/gpu.md.
set -euo pipefail

# The fairseq-train flag(s) of the plugin's bf16 training path (docs/gpu.md), for train:bf16.
BF16_FLAGS="--smoe-bf16"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" "--bf16-flags=$BF16_FLAGS" "$@"
