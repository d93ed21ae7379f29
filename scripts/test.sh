#!/usr/bin/env bash
# Run the whole test suite (slow end-to-end tests included) on a CPU machine.
# Sets up what it needs first (idempotent, seconds when already done).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not slow"   # quick loop while developing
#   bash scripts/test.sh tests/rl -x     # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_system.sh
# Several torch processes share few cores: one thread each unless told otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
