"""scripts/gpu_check.sh (issue 15 item 8) fails clearly where there is no GPU: exit status 2, one
JSON line saying why, nothing started. Its GPU run is not part of CI; `--device cpu` rehearses the
same steps on CPU (docs/operations.md, "One-shot GPU check")."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_says_why_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "INSTRUCTRL_VENV": sys.prefix}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["steps"] == {} and result["device"] == "cuda"
    assert "no CUDA GPU visible" in result["error"] and "--device cpu" in result["error"], result
    assert "INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh" in res.stderr
