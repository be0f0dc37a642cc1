#!/usr/bin/env bash
# One CUDA GPU, under 8 minutes: every check and measurement of bench/gpu.py (the environment,
# 20 CLI steps of the GPU config under sync debugging, the SDPA kernel, the chunked loss in
# three precisions, fp16 overflows, document masks, ours vs transformers at context 2048,
# the reference run's projected time, generation); writes bench/gpu_results.json and
# bench/GPU_RESULTS.md. Run from the repository root after `make setup` (on a CUDA machine
# with PyPI's CUDA torch: make setup TORCH_SPEC="torch>=2.6,<2.14").
# `python -m bench.gpu --dry-run` runs the same script on CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m bench.gpu "$@"
