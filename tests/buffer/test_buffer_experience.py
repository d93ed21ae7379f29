"""ExperienceBuffer against a real Redis: delivery, dedup, staleness, poison, backpressure."""
import threading
import time

import pytest
from buffer_records import make_experience, poison_records
from prometheus_client import REGISTRY

from instructrl.buffer import (
    BufferConfig,
    BufferFull,
    ExperienceBuffer,
    Keys,
    RedisConfig,
    read_dead_letters,
)


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make_buffer(redis_url, run_id):
    opened = []

    def make(**kw):
        cfg = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, **kw)
        buf = ExperienceBuffer.open(cfg)
        opened.append(buf)
        return buf
    yield make
    for buf in opened:
        buf.close()


def drain(buf, consumer="c", n=64, **kw):
    got = []
    while True:
        batch = buf.get(n, consumer, block_ms=0, **kw)
        if not batch and not (batch.duplicates or batch.stale_dropped or batch.dead_lettered):
            return got
        got += batch.sample_ids
        buf.ack(batch)


def test_keys_are_namespaced_by_run_and_group_exists_at_start(make_buffer, run_id):
    buf = make_buffer()
    keys = Keys.for_run(run_id)
    assert keys.experience == f"instructrl:{{{run_id}}}:experience"
    groups = buf.r.xinfo_groups(keys.experience)
    assert [g["name"] for g in groups] == [b"learner"]  # before any record: KEDA can see it


def test_put_get_ack_deletes_and_keeps_lag_exact(make_buffer, run_id):
    buf = make_buffer()
    recs = [make_experience(f"p{i}/e0/s0", seed=i) for i in range(10)]
    assert buf.put(recs) == 10
    batch = buf.get(4, "c")
    assert batch.sample_ids == [r.sample_id for r in recs[:4]]
    assert batch.records[0] == recs[0] and batch.lags == [0] * 4
    assert buf.depth() == 10  # pending still counts as unconsumed
    assert buf.ack(batch) == [True] * 4
    assert buf.depth() == 6
    info = buf.r.xinfo_groups(Keys.for_run(run_id).experience)[0]
    assert info["pending"] == 0 and info["lag"] == 6  # XDEL of acked entries keeps lag known
    assert buf.r.hlen(Keys.for_run(run_id).seen) == 4


def test_a_used_sample_id_is_never_handed_over_again(make_buffer):
    buf = make_buffer()
    dups = metric("instructrl_buffer_duplicates_total", stream="experience")
    buf.put([make_experience("a/e0/s0"), make_experience("b/e0/s0")])
    assert drain(buf) == ["a/e0/s0", "b/e0/s0"]
    # a rollout replica re-generates the same prompt (it died before acking it) ...
    buf.put([make_experience("a/e0/s0", seed=9), make_experience("c/e0/s0"), make_experience("c/e0/s0")])
    assert drain(buf) == ["c/e0/s0"]  # ... and the repeat, plus the in-batch repeat, are dropped
    assert buf.depth() == 0
    assert metric("instructrl_buffer_duplicates_total", stream="experience") - dups == 2


def test_a_sample_id_held_by_the_consumer_is_not_handed_over_again(make_buffer):
    """The learner holds records until its checkpoint: a copy (a re-generated sample) or a
    redelivery of what it holds must not reach it twice. The copy is acked away; the held
    entry stays pending until its own ack."""
    buf = make_buffer(claim_idle_ms=50)
    buf.put([make_experience("h/e0/s0")])
    held = buf.get(10, "learner-0")
    assert held.sample_ids == ["h/e0/s0"]
    buf.put([make_experience("h/e0/s0", seed=5), make_experience("k/e0/s0")])  # a re-generated copy
    time.sleep(0.12)  # the held entry's lease lapses: the next get reclaims it for this same consumer
    again = buf.get(10, "learner-0", block_ms=0)
    assert again.sample_ids == ["k/e0/s0"]
    assert again.reclaimed == 1 and again.duplicates == 2  # the redelivered entry and the copy
    assert buf.depth() == 2  # the copy is gone; the held entry and k are pending, not lost
    assert buf.ack(held) == [True] and buf.ack(again) == [True]
    assert buf.depth() == 0 and buf.r.hlen(buf.keys.seen) == 2


def test_concurrent_commit_of_one_sample_is_won_once(make_buffer):
    buf = make_buffer(claim_idle_ms=50)
    buf.put([make_experience("x/e0/s0")])
    slow = buf.get(1, "slow")
    time.sleep(0.12)
    fast = buf.get(1, "fast")  # reclaimed from the slow consumer
    assert fast.reclaimed == 1 and fast.sample_ids == slow.sample_ids
    assert buf.ack(fast, tag="step1") == [True]
    assert buf.ack(fast, tag="step1") == [True]  # a retried ack is idempotent ...
    assert buf.ack(slow) == [False]  # ... but the slow consumer's commit loses
    owner = buf.r.hget(buf.keys.seen, "x/e0/s0").decode()
    assert owner.startswith("fast|step1|")


def test_touch_renews_the_lease(make_buffer):
    buf = make_buffer(claim_idle_ms=150)
    buf.put([make_experience("t/e0/s0")])
    held = buf.get(1, "a")
    for _ in range(3):
        time.sleep(0.08)
        assert buf.touch(held) == 1
        assert len(buf.reclaim(10, "b")) == 0
    time.sleep(0.2)
    assert buf.reclaim(10, "b").sample_ids == ["t/e0/s0"]
    assert buf.touch(held) == 0  # the lease was lost; touch does not steal it back


def test_a_restarted_consumer_takes_back_what_it_held_at_once(make_buffer):
    """A learner (or worker) restarted under the same consumer name gets its predecessor's
    pending entries on its first read, not claim_idle_ms later (a minute by default)."""
    first = make_buffer(claim_idle_ms=60_000)
    first.put([make_experience(f"h{i}/e0/s0") for i in range(5)])
    assert len(first.get(3, "learner-0")) == 3  # then the process dies, holding 3
    restarted = make_buffer(claim_idle_ms=60_000)
    got = restarted.get(3, "learner-0", block_ms=0)
    assert sorted(got.sample_ids) == [f"h{i}/e0/s0" for i in range(3)]  # its own, first
    assert restarted.get(10, "learner-0", block_ms=0).sample_ids == ["h3/e0/s0", "h4/e0/s0"]
    assert len(make_buffer().get(10, "other", block_ms=0)) == 0  # another consumer waits out the lease


@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_stale_records_are_dropped_or_handed_over_with_their_lag(make_buffer, policy):
    buf = make_buffer()
    before = metric("instructrl_buffer_stale_dropped_total", stream="experience")
    buf.put([make_experience(f"v{v}/e0/s0", version=v) for v in range(6)])
    with pytest.raises(ValueError, match="stale_policy"):
        buf.get(10, "c", learner_version=5, max_policy_lag=2, stale_policy="fix")
    batch = buf.get(10, "c", learner_version=5, max_policy_lag=2, stale_policy=policy)
    if policy == "drop":
        assert [r.policy_version for r in batch.records] == [3, 4, 5]
        assert batch.lags == [2, 1, 0] and batch.stale_dropped == 3
        assert metric("instructrl_buffer_stale_dropped_total", stream="experience") - before == 3
    else:
        assert batch.lags == [5, 4, 3, 2, 1, 0] and batch.stale_dropped == 0
    buf.ack(batch)
    assert buf.depth() == 0


def test_poison_records_land_in_the_dead_letter_stream(make_buffer, run_id):
    buf = make_buffer()
    keys = Keys.for_run(run_id)
    poison = poison_records()
    buf.put([make_experience("good-1/e0/s0")])
    for raw in poison.values():
        buf.r.xadd(keys.experience, {"r": raw})
    buf.r.xadd(keys.experience, {"not_r": b"x"})
    buf.put([make_experience("good-2/e0/s0")])
    before = metric("instructrl_buffer_dead_letters_total", stream="experience", reason="shape")
    assert drain(buf) == ["good-1/e0/s0", "good-2/e0/s0"]
    dead = read_dead_letters(buf.r, run_id)
    reasons = sorted(d["reason"] for d in dead)
    assert reasons == sorted([k.split(":")[0] for k in poison] + ["decode"])
    assert {d["r"] for d in dead} >= set(poison.values())  # the bytes are kept for forensics
    assert all(d["source"] == keys.experience and d["consumer"] == "c" for d in dead)
    assert metric("instructrl_buffer_dead_letters_total", stream="experience", reason="shape") - before == 2
    assert buf.depth() == 0


def test_producers_cannot_put_invalid_records(make_buffer):
    buf = make_buffer()
    bad = make_experience("bad/e0/s0")
    bad.ref_logprobs.raw_data = b"\x00" * 4
    with pytest.raises(ValueError, match="shape"):
        buf.put([make_experience("ok/e0/s0"), bad], validate=True)
    assert buf.depth() == 0


def test_a_record_delivered_too_often_is_dead_lettered(make_buffer, run_id):
    buf = make_buffer(claim_idle_ms=20, max_deliveries=2)
    buf.put([make_experience("crashy/e0/s0")])
    for consumer in ("a", "b"):  # two learners die on it
        assert len(buf.get(1, consumer, block_ms=0)) == 1
        time.sleep(0.06)
    batch = buf.get(1, "c", block_ms=0)  # third delivery would exceed max_deliveries
    assert len(batch) == 0
    assert [d["reason"] for d in read_dead_letters(buf.r, run_id)] == ["max_deliveries"]
    assert buf.depth() == 0


def test_backpressure_blocks_producers_and_resumes_without_trimming(make_buffer):
    buf = make_buffer(capacity=20, put_batch=8)
    waits = metric("instructrl_buffer_backpressure_wait_seconds_count", stream="experience")
    assert buf.put([make_experience(f"a{i}/e0/s0") for i in range(20)]) == 20
    t0 = time.monotonic()
    with pytest.raises(BufferFull, match="capacity 20"):
        buf.put([make_experience("over/e0/s0")], timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert buf.depth() == 20  # nothing trimmed, nothing appended

    done = threading.Event()
    thread = threading.Thread(target=lambda: (
        buf.put([make_experience(f"b{i}/e0/s0") for i in range(10)], timeout_s=10), done.set()))
    thread.start()
    time.sleep(0.3)
    assert not done.is_set() and buf.depth() == 20  # blocked, not trimming
    batch = buf.get(15, "c")
    # delivered records make room even before their ack (a learner acks at its checkpoint)
    assert done.wait(5)
    thread.join()
    assert buf.depth() == 30  # nothing trimmed: 15 pending + 5 + 10 undelivered
    buf.ack(batch)
    assert buf.depth() == 15
    got = batch.sample_ids + drain(buf)
    assert sorted(got) == sorted([f"a{i}/e0/s0" for i in range(20)] + [f"b{i}/e0/s0" for i in range(10)])
    assert metric("instructrl_buffer_backpressure_wait_seconds_count", stream="experience") - waits >= 2


def test_gauges_report_depth_pending_and_lag(make_buffer):
    buf = make_buffer()
    buf.put([make_experience(f"g{i}/e0/s0") for i in range(7)])
    buf.get(3, "c")
    buf.refresh_gauges()
    assert metric("instructrl_buffer_depth", stream="experience") == 7
    assert metric("instructrl_buffer_pending", stream="experience") == 3
    assert metric("instructrl_buffer_consumer_lag", stream="experience") == 4


def test_extra_commands_commit_in_the_same_transaction(make_buffer, run_id):
    buf = make_buffer()
    buf.put([make_experience("e/e0/s0")])
    batch = buf.get(1, "learner-0")
    step_key = f"instructrl:{{{run_id}}}:learner:step"
    assert buf.ack(batch, tag="7", extra=lambda pipe: pipe.set(step_key, 7)) == [True]
    assert buf.r.get(step_key) == b"7" and buf.depth() == 0


def test_a_lost_stream_and_group_are_recreated(make_buffer, run_id):
    """Redis restarted without persistence: the consumer recreates the group and goes on."""
    buf = make_buffer()
    buf.r.delete(Keys.for_run(run_id).experience)
    assert len(buf.get(10, "c", block_ms=0)) == 0
    assert [g["name"] for g in buf.r.xinfo_groups(Keys.for_run(run_id).experience)] == [b"learner"]
    buf.put([make_experience("after/e0/s0")])
    assert drain(buf) == ["after/e0/s0"]


def test_every_entry_deleted_is_counted_under_its_reason(make_buffer, run_id):
    """The outcomes hash (Keys.outcomes) plus XLEN accounts for every entry ever added, and
    survives the processes that settled them (the cluster scenarios audit a run with it):
    committed, stale, duplicate copies, commits another consumer beat, dead letters; a
    retried settlement counts nothing twice."""
    buf = make_buffer(claim_idle_ms=20)
    keys = Keys.for_run(run_id)
    buf.put([make_experience(f"v{v}/e0/s0", version=v) for v in range(4)])  # v0, v1 stale at 3 with lag 1
    buf.r.xadd(keys.experience, {"r": next(iter(poison_records().values()))})
    batch = buf.get(10, "c", learner_version=3, max_policy_lag=1)
    assert batch.sample_ids == ["v2/e0/s0", "v3/e0/s0"] and batch.stale_dropped == 2
    assert buf.ack(batch, tag="s1") == [True, True]
    assert buf.ack(batch, tag="s1") == [True, True]  # retried: counted once
    buf.put([make_experience("v2/e0/s0", seed=3), make_experience("x/e0/s0")])  # a copy of a used sample
    slow = buf.get(10, "slow", block_ms=0)
    assert slow.sample_ids == ["x/e0/s0"] and slow.duplicates == 1
    time.sleep(0.06)
    fast = buf.get(10, "fast", block_ms=0)  # reclaims x from the slow consumer
    assert buf.ack(fast) == [True] and buf.ack(slow) == [False]
    outcomes = {k.decode(): int(v) for k, v in buf.r.hgetall(keys.outcomes(keys.experience)).items()}
    dead = read_dead_letters(buf.r, run_id)
    assert outcomes == {"stale": 2, "committed": 3, "duplicate": 1, f"dead:{dead[0]['reason']}": 1}
    added = buf.r.xinfo_stream(keys.experience)["entries-added"]
    assert added == 7 == sum(outcomes.values()) + buf.depth()
