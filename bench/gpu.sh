#!/usr/bin/env bash
# One CUDA GPU: the checks and measurements of bench/gpu.py that fit in 9 minutes (`--budget`),
# each section under its own time limit and try/except, bench/gpu_results.json rewritten after
# each one (a run cut short keeps what it measured), bench/GPU_RESULTS.md at the end;
# `--missing` in a later lease runs the sections not yet measured. Run from the
# repository root after `make setup-test` (on a CUDA machine with PyPI's CUDA torch:
# make setup-test TORCH_SPEC="torch>=2.9,<2.14"). `--only NAME,...` runs some sections;
# `python -m bench.gpu --dry-run` runs the same script on CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" -m bench.gpu "$@"
