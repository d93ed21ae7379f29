"""PromptQueue against a real Redis, also called from an event loop through threads (the rollout worker)."""
import asyncio
import time

import pytest
from buffer_records import make_experience

from instructrl.buffer import (
    BufferConfig,
    ExperienceBuffer,
    PromptQueue,
    RedisConfig,
    read_dead_letters,
    sample_id_for,
)
from instructrl.codec import sequence
from instructrl.v1 import experience_pb2


def prompts(n, prefix="p"):
    return [experience_pb2.PromptRecord(prompt_id=f"{prefix}{i}", prompt=sequence([1, 2, i])) for i in range(n)]


@pytest.fixture
def cfg(redis_url, run_id):
    return BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, claim_idle_ms=150)


def test_each_prompt_of_an_epoch_is_queued_once_and_survives_a_dead_replica(cfg):
    q = PromptQueue.open(cfg)
    try:
        assert q.put_prompts(prompts(50), epoch=0) == 50
        assert q.put_prompts(prompts(60), epoch=0) == 10  # a restarted loader: only new ids
        assert q.put_prompts(prompts(5), epoch=1) == 5
        held = q.claim(8, "replica-dead")  # dies holding 8 prompts
        assert len(held) == 8
        done = []
        deadline = time.monotonic() + 10
        while len(done) < 65 - 8 or q.depth():
            assert time.monotonic() < deadline
            got = q.claim(16, "replica-ok", block_ms=50)
            done += [(p.epoch, p.prompt_id) for p in got.prompts]
            q.ack(got)
        assert len(done) == len(set(done)) == 65
        assert {(p.epoch, p.prompt_id) for p in held.prompts} <= set(done)
        assert q.depth() == 0
    finally:
        q.close()


def test_poison_prompts_are_dead_lettered(cfg):
    q = PromptQueue.open(cfg)
    try:
        q.put_prompts(prompts(1), epoch=0)
        q.r.xadd(q.keys.prompts, {"r": b"\x0f\x00"})
        got = q.claim(10, "r0", block_ms=0)
        assert [p.prompt_id for p in got.prompts] == ["p0"] and got.dead_lettered == 1
        assert read_dead_letters(q.r, cfg.run_id)[0]["reason"] == "decode"
    finally:
        q.close()


def test_rollout_side_from_an_event_loop_through_threads(cfg):
    """A rollout worker's use: claim, renew the lease, put experience and ack, as concurrent
    asyncio tasks each calling the one synchronous client through `asyncio.to_thread`; the
    learner then gets every record once."""
    async def replica(q, buf, name):
        while True:
            claimed = await asyncio.to_thread(q.claim, 3, name, 50)
            if not claimed.prompts:
                return
            renewed = await asyncio.gather(*(asyncio.to_thread(q.touch, claimed) for _ in range(3)))
            assert renewed == [len(claimed)] * 3
            recs = [make_experience(sample_id_for(p.prompt_id, p.epoch, k), version=2)
                    for p in claimed.prompts for k in range(2)]
            assert await asyncio.to_thread(buf.put, recs) == len(recs)
            await asyncio.to_thread(q.ack, claimed)

    async def main(q, buf):
        assert await asyncio.to_thread(q.put_prompts, prompts(12), 3) == 12
        await asyncio.gather(*(replica(q, buf, f"replica-{i}") for i in range(3)))

    with PromptQueue.open(cfg) as q, ExperienceBuffer.open(cfg) as buf:
        asyncio.run(main(q, buf))
        assert q.depth() == 0
        seen = []
        while len(seen) < 24:
            batch = buf.get(10, "learner", learner_version=2, block_ms=100)
            assert batch.lags == [0] * len(batch) and buf.ack(batch) == [True] * len(batch)
            seen += batch.sample_ids
        assert len(set(seen)) == 24 and "p0/e3/s1" in seen and buf.depth() == 0
