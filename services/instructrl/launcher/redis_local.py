"""Start a private redis-server for a local run (when no Redis URL is given)."""
from __future__ import annotations

import pathlib
import shutil
import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_argv(port: int, data_dir: pathlib.Path, appendonly: bool = True) -> list[str]:
    """argv for a loopback-only redis-server keeping its AOF in `data_dir`."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server) "
                           "or pass a Redis URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir), "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--protected-mode", "yes", "--daemonize", "no"]


def wait_redis(url: str, timeout_s: float = 20.0) -> None:
    import redis
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis at {url} did not answer within {timeout_s}s") from None
            time.sleep(0.1)
