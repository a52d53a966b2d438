#!/usr/bin/env bash
# The CUDA path check (issue 7): run on a machine with an NVIDIA GPU and this repository's venv, or with
# torch + transformers installed. A few minutes on an H100/H200; writes benchmarks/results/gpu.md.
#   bash benchmarks/gpu.sh            # Llama-3.1-8B shapes, 32 layers
#   LAYERS=8 bash benchmarks/gpu.sh   # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_check.py --layers "${LAYERS:-32}" --ctx "${CTX:-512}" --new "${NEW:-64}"
