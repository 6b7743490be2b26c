#!/usr/bin/env bash
# GPU benchmark of seed-215m pretraining: eager vs compiled, micro-batch 16/32/64, activation
# checkpointing off/on, bf16 vs fp32 loss agreement; tokens/s, MFU and peak memory in one table.
# About 8 minutes on one NVIDIA GPU. `bench/gpu.sh --cpu-smoke` runs the same path on CPU in seconds.
# Results: $OUT (or --out DIR) gets gpu_bench.json, gpu_bench.md and per-row logs. Details: bench/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py="$PYTHON"
elif [ -x .venv/bin/python ]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" bench/gpu_bench.py "$@"
