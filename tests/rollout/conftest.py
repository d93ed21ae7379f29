"""Shared fixtures: a tiny model on disk and rollout servers as real subprocesses.

Each server is `python -m instructrl.cli serve rollout ...` in its own session, so
teardown can stop it and vLLM's engine-core child together.
"""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

SERVER_ENV = {"OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny-policy")
    build_tiny_llama(d, TinyModelConfig(hidden_size=128, num_layers=2, num_heads=2, vocab_size=384, seed=0))
    return d


class RolloutProcess:
    """A rollout server subprocess; `address`, `metrics_port`, `log()`, `stop()`."""

    def __init__(self, model_dir: pathlib.Path, log_path: pathlib.Path, overrides: list[str], timeout_s: float = 240):
        args = [sys.executable, "-m", "instructrl.cli", "serve", "rollout", f"engine.model={model_dir}",
                "engine.dtype=float32", "engine.max_model_len=256", "engine.enforce_eager=true",
                "engine.kv_cache_gb=1", "server.port=0", "server.metrics_port=0", "server.grace_s=2",
                "replica_id=test-replica", *overrides]
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **SERVER_ENV}, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        pat = re.compile(r"serving on [\d.]+:(\d+) metrics :(-?\d+)")
        while time.monotonic() < deadline:
            m = pat.search(log_path.read_text())
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                self.address = f"127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rollout server did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:  # the engine-core child shares the session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def rollout_server_factory(tmp_path_factory):
    started: list[RolloutProcess] = []

    def start(model_dir: pathlib.Path, *overrides: str) -> RolloutProcess:
        log_path = tmp_path_factory.mktemp("rollout-log") / "server.log"
        p = RolloutProcess(model_dir, log_path, list(overrides))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
