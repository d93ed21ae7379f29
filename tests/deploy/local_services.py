"""Real instructrl services started as local processes for the Prometheus test.

Today: the reward service with a rule-based reward (no model to load), kept busy by a
thread that sends Score calls, so its gRPC and batching metrics move like a live run.
Add the other services here as they become cheap enough to start in a test.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import deploy_support as ds
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class RewardService:
    """`instructrl serve reward` with the exact-match rule on free loopback ports."""

    def __init__(self, logdir: Path):
        self.port, self.metrics_port = ds.free_port(), ds.free_port()
        self.log_path = Path(logdir) / "reward.log"
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.calls = 0

    def start(self) -> RewardService:
        argv = [sys.executable, "-m", "instructrl.cli", "serve", "reward",
                "rule=instructrl.reward.rules:exact_match", f"server.port={self.port}",
                f"server.metrics_port={self.metrics_port}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"reward service exited:\n{self.log_path.read_text()[-3000:]}")
                try:
                    req = health_pb2.HealthCheckRequest(service="instructrl.v1.RewardService")
                    if stub.Check(req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
            else:
                raise TimeoutError(f"reward service not SERVING in {timeout_s}s:\n{self.log_path.read_text()[-3000:]}")
        self._thread = threading.Thread(target=self._traffic, name="reward-traffic", daemon=True)
        self._thread.start()

    def _traffic(self) -> None:
        from instructrl.v1 import common_pb2, reward_pb2, reward_pb2_grpc

        item = reward_pb2.ScoreItem(prompt=common_pb2.Sequence(text="2+2="),
                                    response=common_pb2.Sequence(text="4"), metadata={"answer": "4"})
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            while not self._stop.wait(0.3):
                try:
                    stub.Score(reward_pb2.ScoreRequest(items=[item, item]), timeout=5)
                    self.calls += 1
                except grpc.RpcError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
