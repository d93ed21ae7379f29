"""A fake rollout replica for weight-sync tests: real gRPC control RPCs and real gloo groups,
no vLLM. It implements the weight-update RPCs of the RolloutService with one `WeightReceiver`
per tensor-parallel "worker" (threads, each its own rank) and keeps what each received.
Shared by the weight-sync and learner tests (importable because tests/ is on pytest's path,
like rollout_process.py)."""
from __future__ import annotations

import time
from concurrent import futures

import grpc
import torch

from instructrl.v1 import rollout_pb2, rollout_pb2_grpc
from instructrl.weight_sync import WeightReceiver


class FakeReplica(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, tp: int = 1):
        self.tp = tp
        self.receivers: list[WeightReceiver] = []
        self.ranks: list[int] = []  # ranks of the last join
        self.world_size = 0
        self.weights: dict[str, torch.Tensor] = {}
        self.worker_weights: list[dict[str, torch.Tensor]] = []
        self.version = 0
        self.stall = False
        self.frozen = False  # as a pod whose link is cut: no RPC answered, nothing received
        self.joins = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def _workers(self, fn) -> list:
        """`fn(worker)` on every TP worker at once (a collective needs all of them)."""
        with futures.ThreadPoolExecutor(self.tp) as pool:
            return list(pool.map(fn, range(self.tp)))

    def JoinWeightGroup(self, req, context):
        for r in self.receivers:
            r.close()
        self.receivers = self._workers(lambda w: WeightReceiver(
            req.init_method, req.rank + w, req.world_size, req.backend, req.timeout_s, group_id=req.group_id))
        self.ranks, self.world_size = [req.rank + w for w in range(self.tp)], req.world_size
        self.joins += 1
        return rollout_pb2.JoinWeightGroupResponse(group_id=req.group_id, rank=req.rank, ranks=self.tp)

    def _freeze(self) -> None:
        t0 = time.monotonic()
        while self.frozen and time.monotonic() - t0 < 30:
            time.sleep(0.05)

    def UpdateWeights(self, req, context):
        self._freeze()
        if not context.is_active():  # held past its deadline while frozen: the learner has moved on
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the caller gave up")
        if any(r.group_id != req.group_id for r in self.receivers):  # as the rollout engine checks
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"not in weight group {req.group_id}")
        if self.stall:
            time.sleep(req.timeout_s)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")
        try:
            got = self._workers(lambda w: {n: t.clone() for n, t in
                                           self.receivers[w].receive(req.manifest, timeout_s=req.timeout_s)})
        except TimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except RuntimeError as e:  # group.Interrupted (abandoned by the learner), GroupUnusable
            context.abort(grpc.StatusCode.ABORTED, str(e))
        self.worker_weights, self.weights, self.version = got, got[0], req.policy_version
        return rollout_pb2.UpdateWeightsResponse(policy_version=req.policy_version)

    def GetStatus(self, req, context):
        self._freeze()
        return rollout_pb2.RolloutStatus(policy_version=self.version, tensor_parallel_size=self.tp)

    def kill(self):
        self.frozen = False
        self.server.stop(0)
        for r in self.receivers:
            r.close()
