"""Supervise local service processes: start, log to files, wait on health, stop cleanly.

`Supervisor` starts each role as its own process group (so Ctrl-C or a death
takes down its children too), writes its stdout/stderr to `<logdir>/<name>.log`,
waits for the standard gRPC health service to report SERVING, and shuts every
process down in reverse order: SIGTERM, a grace period, then SIGKILL. `watch()`
returns the first process that exits unexpectedly with the tail of its log, so
the caller can say which one died and why.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclasses.dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: pathlib.Path
    popen: subprocess.Popen
    health_address: str | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class ProcessDied(RuntimeError):
    def __init__(self, proc: Proc):
        self.proc = proc
        super().__init__(
            f"{proc.name} exited with code {proc.popen.returncode}; last lines of {proc.log_path}:\n"
            f"{proc.log_tail()}")


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment capping a process's compute threads (OpenMP, MKL, torch, tokenizers)."""
    env = dict(os.environ)
    t = str(max(1, threads))
    env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t,
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", INSTRUCTRL_THREADS=t)
    env.update(extra or {})
    return env


class Supervisor:
    """Owns a set of named processes; use as a context manager so they always stop."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              health_address: str | None = None, cwd: str | None = None) -> Proc:
        log_path = self.logdir / f"{name}.log"
        fh = open(log_path, "ab", buffering=0)
        fh.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True, stdin=subprocess.DEVNULL)
        fh.close()
        proc = Proc(name, argv, log_path, popen, health_address)
        self.procs.append(proc)
        return proc

    def python(self, name: str, args: list[str], **kw) -> Proc:
        """Start `python -m instructrl.cli ARGS` with this interpreter."""
        return self.start(name, [sys.executable, "-m", "instructrl.cli", *args], **kw)

    def wait_healthy(self, proc: Proc, timeout_s: float = 300.0) -> None:
        """Poll grpc.health.v1 at the proc's address until SERVING; raise if it dies or times out."""
        assert proc.health_address, f"{proc.name} has no health address"
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(proc.health_address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if not proc.alive():
                    raise ProcessDied(proc)
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"{proc.name} not healthy at {proc.health_address} after {timeout_s:.0f}s; "
                           f"last lines of {proc.log_path}:\n{proc.log_tail()}")

    def check(self, exclude: tuple[str, ...] = ()) -> None:
        """Raise `ProcessDied` for the first process that has exited."""
        for p in self.procs:
            if p.name not in exclude and not p.alive():
                raise ProcessDied(p)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every live process (newest first), wait up to `grace_s`, then SIGKILL."""
        for p in reversed(self.procs):
            if p.alive():
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for p in reversed(self.procs):
            left = max(0.1, deadline - time.monotonic())
            try:
                p.popen.wait(timeout=left)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait(timeout=10)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
