#!/usr/bin/env bash
# Set everything up (idempotent) and run the main job: the end-to-end demo on a tiny model.
#   bash scripts/demo.sh                 # full demo, writes runs/demo/report.md
#   bash scripts/demo.sh --quick         # a shortened run (what CI's end-to-end test does)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v redis-server >/dev/null 2>&1 || bash scripts/setup_system.sh
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec .venv/bin/instructrl demo "$@"
