"""instructrl.rl stays pure: only torch and the standard library, no I/O stacks."""

import ast
import os
import pathlib
import subprocess
import sys

import instructrl.rl

RL_DIR = pathlib.Path(instructrl.rl.__file__).parent
ALLOWED_TOP_LEVEL = {"torch", "math", "dataclasses", "typing", "__future__"}
FORBIDDEN = ["grpc", "redis", "deepspeed", "vllm", "transformers", "numpy", "google.protobuf"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_import_pulls_in_no_service_stack():
    # torch itself imports numpy when it is installed, so numpy is checked separately below
    code = (
        "import sys, instructrl.rl\n"
        f"bad = [m for m in {FORBIDDEN!r} if m != 'numpy' and m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_works_with_numpy_blocked():
    # numpy made unimportable: instructrl.rl must import and compute without it
    code = (
        "import sys\n"
        "sys.modules['numpy'] = None\n"
        "import torch, instructrl.rl as rl\n"
        "m = torch.ones(2, 3)\n"
        "adv, _ = rl.compute_gae(torch.randn(2, 3), torch.randn(2, 3), m, 1.0, 0.95)\n"
        "rl.masked_whiten(adv, m)\n"
        "rl.kwise_ranking_loss(torch.randn(2, 4), torch.tensor([2, 4]))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def test_source_imports_only_torch_and_stdlib():
    files = sorted(RL_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "masked.py", "kl.py", "advantages.py", "ppo.py", "preference.py"}
    for path in files:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: inside instructrl.rl
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in ALLOWED_TOP_LEVEL, f"{path.name}: import {name}"
        # grep-style: no dynamic imports, no I/O
        for needle in ("__import__", "importlib", "open(", "pickle"):
            assert needle not in text, f"{path.name} contains {needle!r}"


def test_package_root_stays_light():
    proc = _run("import sys, instructrl\nassert 'torch' not in sys.modules and 'instructrl.rl' not in sys.modules")
    assert proc.returncode == 0, proc.stderr
