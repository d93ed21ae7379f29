"""A rollout server as a real subprocess (`python -m instructrl.cli serve rollout ...`), in its
own session so that stopping it also stops vLLM's engine-core child. Shared by the rollout and
learner tests (importable because tests/ is on pytest's path, like redis_server.py)."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

# torch.distributed variables a test process may carry must not leak into the server
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SERVER_ENV = {"OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


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
                                     env={**{k: v for k, v in os.environ.items() if k not in _DIST_VARS}, **SERVER_ENV},
                                     start_new_session=True)
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
