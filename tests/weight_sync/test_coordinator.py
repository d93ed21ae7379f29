"""WeightSyncCoordinator against fake replicas: real gRPC control RPCs + real gloo groups.

A fake replica implements the weight-update RPCs of the RolloutService with a
`WeightReceiver` and keeps what it received; no vLLM involved (the real server is
covered in tests/rollout/test_weight_update.py).
"""
from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
import torch

from instructrl.v1 import rollout_pb2, rollout_pb2_grpc
from instructrl.weight_sync import WeightReceiver, WeightSyncCoordinator

TIMEOUT = 4.0


class FakeReplica(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self):
        self.receiver: WeightReceiver | None = None
        self.weights: dict[str, torch.Tensor] = {}
        self.version = 0
        self.stall = False
        self.joins = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        rollout_pb2_grpc.add_RolloutServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def JoinWeightGroup(self, req, context):
        if self.receiver is not None:
            self.receiver.close()
        self.receiver = WeightReceiver(req.init_method, req.rank, req.world_size, req.backend, req.timeout_s,
                                       group_id=req.group_id)
        self.joins += 1
        return rollout_pb2.JoinWeightGroupResponse(group_id=req.group_id, rank=req.rank)

    def UpdateWeights(self, req, context):
        if self.stall:
            time.sleep(req.timeout_s)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")
        try:
            got = {n: t.clone() for n, t in self.receiver.receive(req.manifest, timeout_s=req.timeout_s)}
        except TimeoutError as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        self.weights, self.version = got, req.policy_version
        return rollout_pb2.UpdateWeightsResponse(policy_version=req.policy_version)

    def GetStatus(self, req, context):
        return rollout_pb2.RolloutStatus(policy_version=self.version)

    def kill(self):
        self.server.stop(0)
        if self.receiver is not None:
            self.receiver.close()


def _model(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(64, 96 + i, generator=g)) for i in range(6)] + [
        ("norm", torch.randn(64, generator=g).to(torch.bfloat16))]


def _same(replica: FakeReplica, named) -> bool:
    return set(replica.weights) == {n for n, _ in named} and all(
        torch.equal(replica.weights[n], t) for n, t in named)


@pytest.fixture
def replicas():
    made: list[FakeReplica] = []

    def make(k: int) -> list[FakeReplica]:
        new = [FakeReplica() for _ in range(k)]
        made.extend(new)
        return new
    yield make
    for r in made:
        r.kill()


@pytest.fixture
def coord():
    c = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=TIMEOUT, bucket_mb=1)
    c.bucket_bytes = 16 * 1024  # several buckets for this small model
    yield c
    c.close()


def test_sync_reaches_every_replica_and_reuses_the_group(replicas, coord):
    a, b = replicas(2)
    coord.set_replicas([a.address, b.address])
    for version in (1, 2):
        named = _model(version)
        res = coord.sync(lambda: iter(named), version)
        assert res.replicas_ok == [a.address, b.address] and res.replicas_failed == []
        assert res.bytes > 0 and res.seconds < TIMEOUT
        assert a.version == b.version == version and _same(a, named) and _same(b, named)
    assert a.joins == b.joins == 1  # same replicas, last sync fine: no rebuild


def test_dead_replica_is_reported_and_left_out(replicas, coord):
    a, b = replicas(2)
    dead = "127.0.0.1:1"  # nothing listens there
    coord.set_replicas([a.address, dead, b.address])
    named = _model(3)
    res = coord.sync(lambda: iter(named), 3)
    assert res.replicas_failed == [dead] and sorted(res.replicas_ok) == sorted([a.address, b.address])
    assert _same(a, named) and _same(b, named)
    res = coord.sync(lambda: iter(named), 4)  # still dead: reported, group kept
    assert res.replicas_failed == [dead] and a.joins == b.joins == 1
    assert a.version == b.version == 4


def test_replica_dying_between_syncs_is_dropped_then_group_rebuilt(replicas, coord):
    a, b = replicas(2)
    coord.set_replicas([a.address, b.address])
    assert coord.sync(lambda: iter(_model(1)), 1).replicas_failed == []
    b.kill()
    t0 = time.monotonic()
    res = coord.sync(lambda: iter(_model(2)), 2)
    assert time.monotonic() - t0 < TIMEOUT + 2
    assert b.address in res.replicas_failed
    res = coord.sync(lambda: iter(_model(3)), 3)  # rebuilt without b
    assert res.replicas_ok == [a.address] and res.replicas_failed == [b.address]
    assert a.version == 3 and _same(a, _model(3)) and coord.replicas == [a.address]


def test_stalled_replica_times_out_and_rejoins(replicas, coord):
    a, b = replicas(2)
    coord.set_replicas([a.address, b.address])
    assert coord.sync(lambda: iter(_model(1)), 1).replicas_failed == []
    b.stall = True
    t0 = time.monotonic()
    res = coord.sync(lambda: iter(_model(2)), 2)
    assert time.monotonic() - t0 < TIMEOUT + 2  # never waits past timeout_s (+ scheduling slack)
    assert b.address in res.replicas_failed and b.version == 1
    b.stall = False
    res = coord.sync(lambda: iter(_model(3)), 3)
    assert sorted(res.replicas_ok) == sorted([a.address, b.address]) and res.replicas_failed == []
    assert _same(a, _model(3)) and _same(b, _model(3)) and b.joins == 2


def test_no_replicas_is_a_no_op(coord):
    res = coord.sync(lambda: iter(_model(1)), 1)
    assert res.replicas_ok == [] and res.replicas_failed == [] and res.bytes == 0
