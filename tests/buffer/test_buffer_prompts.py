"""PromptQueue and the asyncio classes against a real Redis."""
import asyncio
import time

import pytest
from buffer_records import make_experience

from instructrl.buffer import (
    AsyncExperienceBuffer, AsyncPromptQueue, BufferConfig, PromptQueue, RedisConfig,
    read_dead_letters, sample_id_for,
)
from instructrl.v1 import common_pb2, experience_pb2


def prompts(n, prefix="p"):
    return [experience_pb2.PromptRecord(prompt_id=f"{prefix}{i}", prompt=common_pb2.Sequence(
        token_ids=common_pb2.TokenIds(ids=[1, 2, i]))) for i in range(n)]


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


def test_asyncio_rollout_side_end_to_end(cfg):
    """A rollout replica's loop: claim prompts, put experience, ack prompts; the learner's
    asyncio side gets and acks."""
    async def main():
        q = await AsyncPromptQueue.open(cfg)
        buf = await AsyncExperienceBuffer.open(cfg)
        step_key = f"{buf.keys.prefix}:learner:step"
        try:
            assert await q.put_prompts(prompts(12), epoch=3) == 12
            assert await q.put_prompts(prompts(12), epoch=3) == 0
            while await q.depth():
                claimed = await q.claim(5, "replica-0", block_ms=50)
                assert await q.touch(claimed) == len(claimed)
                recs = [make_experience(sample_id_for(p.prompt_id, p.epoch, k), version=2)
                        for p in claimed.prompts for k in range(2)]
                assert await buf.put(recs) == len(recs)
                await q.ack(claimed)
            seen = []
            while len(seen) < 24:
                batch = await buf.get(10, "learner", learner_version=2, block_ms=100)
                assert batch.lags == [0] * len(batch)
                flags = await buf.ack(batch, tag="s1", extra=lambda pipe: pipe.incr(step_key))
                assert flags == [True] * len(batch)
                seen += batch.sample_ids
            assert int(await buf.r.get(step_key)) >= 3
            assert len(set(seen)) == 24 and "p0/e3/s1" in seen
            assert await buf.depth() == 0
        finally:
            await q.close()
            await buf.close()
    asyncio.run(main())
