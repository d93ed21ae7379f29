"""Staleness-aware pacing (buffer/pacing.py) against a real Redis: the admission rule, ticket
life cycle, and a simulated run whose every trained record stays within max_policy_lag."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import redis

from instructrl.buffer import BufferConfig, ExperienceBuffer
from instructrl.buffer.config import RedisConfig
from instructrl.buffer.pacing import Pacing, Refusal, Ticket
from instructrl.codec import encode
from instructrl.v1 import experience_pb2


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def record(sample_id: str, version: int) -> experience_pb2.Experience:
    one = encode(np.zeros(1, dtype=np.int32))
    lp = encode(np.zeros(1, dtype=np.float32))
    return experience_pb2.Experience(sample_id=sample_id, prompt_id=sample_id.split("/")[0],
                                     prompt_token_ids=one, response_token_ids=one, sampling_logprobs=lp,
                                     ref_logprobs=lp, policy_version=version, finish_reason="stop")


def test_nothing_is_admitted_before_the_learner_publishes(client, run_id):
    p = Pacing(client, run_id)
    assert p.admit("r0", 0, 8, 4) == Refusal("no_learner", 0, 0)
    p.publish(version=0, max_policy_lag=1, batch_size=8, held=0)
    t = p.admit("r0", 0, 32, 4)
    assert isinstance(t, Ticket) and t.samples == 16  # (L + 1) * B = 16 outstanding at most
    refused = p.admit("r1", 0, 4, 4)
    assert isinstance(refused, Refusal) and refused.reason == "full" and refused.budget == 0
    assert p.outstanding() == 16


def test_grants_are_whole_prompts(client, run_id):
    p = Pacing(client, run_id)
    p.publish(version=0, max_policy_lag=0, batch_size=10, held=0)
    t = p.admit("r0", 0, 100, 4)
    assert t.samples == 8  # 10 // 4 prompts of 4 samples
    assert p.admit("r0", 0, 4, 4).reason == "full"  # 2 left: less than one prompt


def test_budget_follows_written_trained_and_acked_records(client, run_id, redis_url):
    cfg = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id)
    buf = ExperienceBuffer.open(cfg)
    p = Pacing(client, run_id)
    p.publish(version=0, max_policy_lag=1, batch_size=4, held=0)
    t = p.admit("r0", 0, 8, 2)
    assert t.samples == 8
    # 4 samples written, the ticket shrinks to the 4 still generating: O unchanged
    buf.put([record(f"a{i}/e0/s0", 0) for i in range(4)])
    t = p.resize(t, 4)
    assert p.outstanding() == 8
    # the learner reads and trains those 4 (iteration 0 -> 1): they are held, not outstanding
    got = buf.get(4, "learner-0", learner_version=0, block_ms=0)
    assert len(got) == 4
    p.publish(version=1, max_policy_lag=1, batch_size=4, held=4)
    assert p.outstanding() == 4
    assert p.admit("r0", 0, 8, 2).reason == "full"  # replica at 0 is 1 behind: budget (1 + 1 - 1) * 4 - 4 = 0
    assert p.admit("r0", 1, 8, 2).samples == 4  # at version 1: (2 * 4) - 4
    # the checkpoint acks them; `held` falls in the same transaction as the XDEL
    buf.ack(got, tag="v1", extra=lambda pipe: p.released_in(pipe, len(got)))
    assert p.state().held == 0 and p.outstanding() == 8
    p.release(t)
    assert p.outstanding() == 4
    buf.close()


def test_a_replica_more_than_max_policy_lag_behind_is_refused(client, run_id):
    p = Pacing(client, run_id)
    p.publish(version=5, max_policy_lag=1, batch_size=8, held=0)
    refused = p.admit("r0", 3, 8, 1)
    assert refused.reason == "stale" and refused.learner_version == 5
    assert p.admit("r0", 4, 16, 1).samples == 8  # one behind: (1 + 1 - 1) * 8
    assert p.admit("r0", 9, 16, 1).samples == 8  # ahead (another lineage) counts as current: 16 - 8


def test_finished_learner_admits_nothing_and_no_limit_admits_everything(client, run_id):
    p = Pacing(client, run_id)
    p.publish(version=3, max_policy_lag=None, batch_size=8, held=0)
    assert p.admit("r0", 0, 10_000, 4).samples == 10_000
    p.publish(version=3, max_policy_lag=1, batch_size=8, held=0, finished=True)
    assert p.admit("r0", 3, 4, 4).reason == "finished"


def test_tickets_of_a_dead_worker_expire_and_renewal_keeps_live_ones(client, run_id):
    p = Pacing(client, run_id, ticket_ttl_ms=300)
    p.publish(version=0, max_policy_lag=0, batch_size=8, held=0)
    dead, live = p.admit("dead", 0, 4, 1), p.admit("live", 0, 4, 1)
    assert p.outstanding() == 8
    for _ in range(3):
        time.sleep(0.15)
        p.renew([live])
    assert p.outstanding() == 4  # the dead worker's ticket expired
    assert p.admit("other", 0, 8, 1).samples == 4
    p.release(live)
    p.renew([live])  # renewing a released ticket does not revive it
    assert p.outstanding() == 4
    assert p.resize(dead, 1) is None


def _simulate(redis_url: str, run_id: str, max_policy_lag: int | None, iterations: int) -> list[int]:
    """Three workers (random generation times, weights synced after a delay) and a learner
    (B = 8, random training time); returns the lag of every trained record."""
    B, N = 8, 2  # batch, samples per prompt
    cfg = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=20)
    stop = threading.Event()
    version = {"learner": 0, "replica": 0}
    lags: list[int] = []

    def worker(name: str, seed: int) -> None:
        rng = random.Random(seed)
        buf = ExperienceBuffer(cfg)
        p = Pacing(buf.r, run_id)
        k = 0
        while not stop.is_set():
            w = version["replica"]
            t = p.admit(name, w, 4 * N, N)
            if isinstance(t, Refusal):
                time.sleep(0.005)
                continue
            time.sleep(rng.uniform(0.002, 0.02))  # generation
            buf.put([record(f"{name}-{k}-{i}/e0/s0", w) for i in range(t.samples)])
            p.release(t)
            k += 1
        buf.close()

    def sync_later(v: int) -> None:
        time.sleep(0.01)
        version["replica"] = max(version["replica"], v)

    threads = [threading.Thread(target=worker, args=(f"w{i}", i)) for i in range(3)]
    buf = ExperienceBuffer(cfg)
    p = Pacing(buf.r, run_id)
    p.publish(0, max_policy_lag, B, 0)
    for th in threads:
        th.start()
    try:
        held = []
        for v in range(iterations):
            batch = []
            while len(batch) < B:
                got = buf.get(B - len(batch), "learner-0", learner_version=v)
                batch += got.records
                held.append(got)
            lags += [v - r.policy_version for r in batch]
            time.sleep(0.03)  # training
            version["learner"] = v + 1
            p.publish(v + 1, max_policy_lag, B, sum(len(g) for g in held))
            threading.Thread(target=sync_later, args=(v + 1,)).start()
            if (v + 1) % 3 == 0:  # ack at a "checkpoint"
                for g in held:
                    buf.ack(g, tag=f"v{v + 1}", extra=lambda pipe, g=g: p.released_in(pipe, len(g)))
                held = []
    finally:
        stop.set()
        for th in threads:
            th.join(10)
        buf.close()
    return lags


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_every_trained_record_is_within_max_policy_lag(redis_url, run_id, lag):
    lags = _simulate(redis_url, run_id, lag, iterations=12)
    assert len(lags) == 12 * 8
    assert max(lags) <= lag, f"lags seen: {sorted(set(lags))}"


def test_without_pacing_the_same_run_goes_stale(redis_url, run_id):
    """The contrast that shows the test above can fail: no limit, workers run far ahead."""
    lags = _simulate(redis_url, run_id, None, iterations=12)
    assert max(lags) > 2
