"""The tree is lint- and type-clean: `ruff check` (the rules in pyproject's [tool.ruff]) over
services/, tests/, bench/ and scripts/, and `mypy` over the package ([tool.mypy]). Part of the
suite so that CI (`bash scripts/test.sh`) fails on a finding, naming the file and line."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed in this environment (the dev extra has it)")
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing():
    out = _run("ruff", "check", "--output-format", "concise", "services", "tests", "bench", "scripts")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_mypy_finds_nothing():
    out = _run("mypy")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
