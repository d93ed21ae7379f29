"""Real Redis servers for tests: find the shared one or start private ones.

Kept out of conftest.py so fixtures stay short. Every server started here is a child
process stopped by its owner (fixture teardown); nothing is left running.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

INSTALL_HINT = "install redis-server (Debian: apt-get install redis-server)"
SHARED_URL = "redis://127.0.0.1:6379/0"
URL_ENV = "INSTRUCTRL_TEST_REDIS_URL"  # use this server instead of probing 127.0.0.1:6379


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(f"the tests need a real Redis server: {INSTALL_HINT}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def delete_namespace(url: str, marker: str) -> int:
    """Delete the keys whose name contains `marker` (a unique run id); never FLUSHDB."""
    assert len(marker) >= 8, "marker must be unique enough to touch only one test's keys"
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"*{marker}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i:i + 1000])
        return len(keys)
    finally:
        client.close()


class RedisServer:
    """A private redis-server on a free port with its files in `workdir`.

    appendonly=True gives `appendonly yes` + `appendfsync always`, so every write the
    server acknowledged survives kill() + start(). `args` adds raw config options.
    """

    def __init__(self, workdir: Path, *, appendonly: bool = False, args: list[str] | None = None,
                 port: int | None = None, scheme: str = "redis", userinfo: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.args = list(args or [])
        self.url = f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}/0"
        self.log = self.workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--logfile", str(self.log), "--save", "", "--daemonize", "no"]
        if not any(a == "--tls-port" for a in self.args):
            cmd += ["--port", str(self.port)]
        if self.appendonly:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        return cmd + self.args

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {err}\n{self._log_tail()}")
            if self.log.exists():
                with open(self.log, "rb") as f:
                    f.seek(offset)
                    if b"Ready to accept connections" in f.read():
                        return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not start in {timeout_s}s\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no final fsync (what a crash looks like)."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: graceful shutdown."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
