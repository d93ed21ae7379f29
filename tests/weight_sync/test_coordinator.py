"""WeightSyncCoordinator against fake replicas: real gRPC control RPCs + real gloo groups.

A fake replica (tests/fake_replica.py) implements the weight-update RPCs of the
RolloutService with one `WeightReceiver` per tensor-parallel "worker" and keeps what each
received; no vLLM involved (the real server, TP 1 and 2, is covered in
tests/rollout/test_weight_update.py and test_tensor_parallel.py).
"""
from __future__ import annotations

import time

import pytest
import torch
from fake_replica import FakeReplica

from instructrl.weight_sync import WeightSyncCoordinator, plan_ranks

TIMEOUT = 4.0


def _model(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"w{i}", torch.randn(64, 96 + i, generator=g)) for i in range(6)] + [
        ("norm", torch.randn(64, generator=g).to(torch.bfloat16))]


def _same(replica: FakeReplica, named) -> bool:
    """Every TP worker of `replica` holds exactly `named`."""
    return len(replica.worker_weights) == replica.tp and all(
        set(w) == {n for n, _ in named} and all(torch.equal(w[n], t) for n, t in named)
        for w in replica.worker_weights)


@pytest.fixture
def replicas():
    made: list[FakeReplica] = []

    def make(k: int, tp: int = 1) -> list[FakeReplica]:
        new = [FakeReplica(tp) for _ in range(k)]
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
        res = coord.sync(lambda named=named: iter(named), version)
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


def test_a_member_gone_without_leaving_does_not_sink_the_rebuilt_group(replicas, coord):
    """Scale-down on the cluster bed (issue 13 scenario 2): one replica leaves the group
    (unregistered), another pod is gone without unregistering. The group rebuilt for the
    remaining replicas must not wait for the gone one: the healthy replica gets the version."""
    a, b, c = replicas(3)
    coord.set_replicas([a.address, b.address, c.address])
    assert coord.sync(lambda: iter(_model(1)), 1).replicas_failed == []
    c.kill()
    coord.set_replicas([a.address, c.address])  # b unregistered; c is still registered
    t0 = time.monotonic()
    res = coord.sync(lambda: iter(_model(2)), 2)
    assert res.replicas_ok == [a.address] and res.replicas_failed == [c.address], res
    assert a.version == 2 and _same(a, _model(2)) and time.monotonic() - t0 < TIMEOUT + 2


def test_a_member_lost_mid_broadcast_costs_the_others_less_than_one_timeout(replicas, coord):
    """Issue 13 scenario 3: a member whose link is cut during a broadcast (it answers nothing,
    receives nothing) would stall the broadcast for every member until the deadline; the
    coordinator must find it gone, abandon the update and resend it to the others at once."""
    a, b, c = replicas(3)
    coord.set_replicas([a.address, b.address, c.address])
    assert coord.sync(lambda: iter(_model(1)), 1).replicas_failed == []
    c.frozen = True
    t0 = time.monotonic()
    res = coord.sync(lambda: iter(_model(2)), 2)
    took = time.monotonic() - t0
    assert sorted(res.replicas_ok) == sorted([a.address, b.address]) and res.replicas_failed == [c.address], res
    assert _same(a, _model(2)) and _same(b, _model(2)) and c.version == 1
    assert took < TIMEOUT, f"the others got the version {took:.1f}s after the sync began (timeout_s {TIMEOUT})"
    # while it stays gone, it is outside the group: each sync waits for its probe briefly, not probe_timeout_s
    t0 = time.monotonic()
    res = coord.sync(lambda: iter(_model(3)), 3)
    assert res.replicas_failed == [c.address] and _same(a, _model(3)) and _same(b, _model(3)), res
    assert time.monotonic() - t0 < TIMEOUT / 2, f"a sync waited {time.monotonic() - t0:.1f}s for the gone replica"
    c.frozen = False
    res = coord.sync(lambda: iter(_model(4)), 4)
    assert sorted(res.replicas_ok) == sorted([a.address, b.address, c.address]), res
    assert all(_same(r, _model(4)) for r in (a, b, c))


def test_a_small_update_is_resent_when_the_member_relaying_it_is_lost(replicas, coord):
    """The same with one bucket that the sockets take whole: the sender's part of the broadcast
    completes at once, but gloo relays it through other ranks (a tree), so a lost relay leaves its
    subtree waiting. Each member in turn is the lost one; the others get every version in time."""
    coord.bucket_bytes = 64 * 1024 * 1024
    members = replicas(3)
    coord.set_replicas([r.address for r in members])
    version = 1
    assert coord.sync(lambda: iter(_model(version)), version).replicas_failed == []
    for lost in members:
        others = [r for r in members if r is not lost]
        lost.frozen = True
        version += 1
        t0 = time.monotonic()
        res = coord.sync(lambda v=version: iter(_model(v)), version)
        took = time.monotonic() - t0
        assert res.replicas_failed == [lost.address] and all(_same(r, _model(version)) for r in others), res
        assert took < TIMEOUT, f"the others got v{version} {took:.1f}s after the sync began (timeout_s {TIMEOUT})"
        lost.frozen = False
        version += 1
        assert sorted(coord.sync(lambda v=version: iter(_model(v)), version).replicas_ok) == sorted(
            r.address for r in members)


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


def test_plan_ranks_gives_each_replica_its_tensor_parallel_ranks():
    assert plan_ranks([]) == (1, {})
    assert plan_ranks([("a", 1), ("b", 1)]) == (3, {"a": 1, "b": 2})
    assert plan_ranks([("a", 1), ("b", 2), ("c", 4), ("d", 1)]) == (9, {"a": 1, "b": 2, "c": 4, "d": 8})
    with pytest.raises(ValueError, match="at least 1"):
        plan_ranks([("a", 0)])
    with pytest.raises(ValueError, match="twice"):
        plan_ranks([("a", 1), ("a", 2)])


def test_tensor_parallel_replicas_take_one_rank_per_worker(replicas, coord):
    """World size = 1 + the sum of the replicas' TP sizes; every TP worker gets every weight;
    a TP replica joining later rebuilds the group with the new layout."""
    a, = replicas(1, tp=1)
    b, = replicas(1, tp=2)
    coord.set_replicas([a.address, b.address])
    res = coord.sync(lambda: iter(_model(1)), 1)
    assert res.replicas_ok == [a.address, b.address] and res.replicas_failed == [], res
    assert a.world_size == b.world_size == 4 and a.ranks == [1] and b.ranks == [2, 3]
    assert _same(a, _model(1)) and _same(b, _model(1))
    c, = replicas(1, tp=3)
    coord.set_replicas([a.address, b.address, c.address])
    res = coord.sync(lambda: iter(_model(2)), 2)
    assert sorted(res.replicas_ok) == sorted([a.address, b.address, c.address]), res
    assert {r.world_size for r in (a, b, c)} == {7}
    assert sorted(a.ranks + b.ranks + c.ranks) == list(range(1, 7)) and c.ranks == [4, 5, 6]
    assert all(_same(r, _model(2)) for r in (a, b, c))
