#!/usr/bin/env bash
# One-shot GPU check (scripts/gpu_check.py): on a machine with one CUDA GPU and the GPU extra
# installed (INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh), CUDA vLLM generates, a learner PPO
# iteration on the GPU broadcasts its weights into it, greedy output equals transformers', and
# bench/scoring.py --device cuda and bench/rollout.py run; prints one JSON line, in < 8 minutes.
#
#   bash scripts/gpu_check.sh [--device cpu] [--budget-s 480] [--redis-url URL] [--keep]
#
# Exit status: 0 all steps passed, 1 a step failed (see the JSON line), 2 it cannot run here
# (no GPU, no GPU build of vLLM, ...). CI never runs it. See docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${INSTRUCTRL_VENV:-$(pwd)/.venv}/bin/python
[ -x "$PY" ] || { echo "gpu_check: no virtual environment at ${PY%/bin/python}: run INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh" >&2; exit 2; }
exec "$PY" scripts/gpu_check.py "$@"
