"""asyncio twins of `PromptQueue` and `ExperienceBuffer` for the rollout replicas.

Same streams, scripts and guarantees: only the Redis I/O differs; decoding, validation,
dedup and staleness decisions are the pure functions of `streams`, `experience` and
`prompts`, shared with the sync classes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from instructrl.buffer import experience as ex
from instructrl.buffer import metrics as m
from instructrl.buffer import prompts as pr
from instructrl.buffer.config import BufferConfig, Keys
from instructrl.buffer.connection import async_redis_from_url
from instructrl.buffer.scripts import PUT_LUA, RESERVE_LUA, RESERVE_TTL_MS, SETTLE_LUA, TOUCH_LUA
from instructrl.buffer.streams import (
    Clock, Dead, Entry, StreamSpec, Waiter, count_dead, full_error, gauges, is_nogroup,
    over_delivered, parse_read, put_args, put_keys, reservation, settle_args, settle_chunks,
)
from instructrl.v1 import experience_pb2

log = logging.getLogger(__name__)


class AsyncGroupStream:
    """asyncio version of `streams.GroupStream` (see there for the semantics)."""

    def __init__(self, client: aioredis.Redis, spec: StreamSpec, put_batch: int, gauge_interval_s: float):
        self.r, self.spec = client, spec
        self.put_batch = min(put_batch, spec.capacity)
        self.gauge_interval_s = gauge_interval_s
        self._put = client.register_script(PUT_LUA)
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._touch = client.register_script(TOUCH_LUA)
        self._clock = Clock(spec.claim_idle_ms)
        self._cursor: bytes | str = "0-0"
        self._gauges_at = 0.0

    async def setup(self) -> None:
        m.BACKPRESSURE_WAIT.labels(self.spec.label)  # a series from the start, not from the first wait
        try:
            await self.r.xgroup_create(self.spec.key, self.spec.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def append(self, records, timeout_s: float, dedup_key: str | None = None) -> int:
        appended = 0
        for i in range(0, len(records), self.put_batch):
            chunk = records[i:i + self.put_batch]
            waiter = Waiter(timeout_s)
            while True:
                n, depth = await self._try_append(chunk, dedup_key)
                if n >= 0:
                    break
                delay = waiter.next_delay()
                if delay is None:
                    m.BACKPRESSURE_WAIT.labels(self.spec.label).observe(waiter.waited())
                    raise full_error(self.spec, depth, waiter.waited())
                await asyncio.sleep(delay)
            if waiter.slept:
                m.BACKPRESSURE_WAIT.labels(self.spec.label).observe(waiter.waited())
            appended += n
        await self.maybe_refresh_gauges()
        return appended

    async def _try_append(self, chunk, dedup_key: str | None) -> tuple[int, int]:
        if dedup_key is not None:
            return await self._put(keys=put_keys(self.spec, dedup_key), args=put_args(self.spec, chunk))
        member = reservation(len(chunk))
        n, depth = await self._reserve(keys=[self.spec.key, self.spec.reserved_key],
                                       args=[self.spec.capacity, len(chunk), member, RESERVE_TTL_MS,
                                             self.spec.group])
        if n >= 0:
            pipe = self.r.pipeline(transaction=False)
            for _, fields in chunk:
                pipe.xadd(self.spec.key, dict(zip(fields[::2], fields[1::2])))
            pipe.zrem(self.spec.reserved_key, member)
            await pipe.execute()
        return n, depth

    async def read(self, consumer: str, n: int, block_ms: int | None) -> tuple[list[Entry], int]:
        try:
            entries = await self.reclaim(consumer, n) if self._clock.due() else []
            reclaimed = len(entries)
            if len(entries) < n:
                block = None if entries or not block_ms else block_ms
                reply = await self.r.xreadgroup(self.spec.group, consumer, {self.spec.key: ">"},
                                                count=n - len(entries), block=block)
                entries += parse_read(reply)
        except ResponseError as err:
            if not is_nogroup(err):
                raise
            log.warning("group %s on %s vanished (Redis lost its data?); recreating it",
                        self.spec.group, self.spec.key)
            await self.setup()
            return [], 0
        await self.maybe_refresh_gauges()
        return entries, reclaimed

    async def reclaim(self, consumer: str, n: int) -> list[Entry]:
        reply = await self.r.xautoclaim(self.spec.key, self.spec.group, consumer,
                                        self.spec.claim_idle_ms, self._cursor, count=n)
        self._cursor, claimed = reply[0], [(eid, f) for eid, f in reply[1]]
        self._clock.done(full=len(claimed) >= n)
        if not claimed:
            return []
        m.RECLAIMED.labels(self.spec.label).inc(len(claimed))
        pipe = self.r.pipeline(transaction=False)
        for eid, _ in claimed:
            pipe.xpending_range(self.spec.key, self.spec.group, eid, eid, 1)
        keep, dead = over_delivered(self.spec, claimed, await pipe.execute())
        if dead:
            await self.settle(consumer, dead=dead)
        return keep

    async def settle(self, consumer: str, *, commits: Sequence[tuple[bytes, str]] = (),
                     drops: Sequence[bytes] = (), dead: Sequence[Dead] = (),
                     seen_key: str | None = None, token: str = "",
                     extra: Callable | None = None) -> list[bool]:
        keys = [self.spec.key, seen_key or self.spec.key, self.spec.dead_key]
        chunks = list(settle_chunks(commits, drops, dead))
        if not chunks and extra is None:
            return []
        if extra is None and len(chunks) == 1:
            flags = await self._settle(keys=keys, args=settle_args(self.spec, consumer, token, *chunks[0]))
        else:
            pipe = self.r.pipeline(transaction=True)
            for chunk in chunks:
                pipe.eval(SETTLE_LUA, 3, *keys, *settle_args(self.spec, consumer, token, *chunk))
            if extra is not None:
                extra(pipe)
            results = await pipe.execute()
            flags = [f for r in results[:len(chunks)] for f in r]
        count_dead(self.spec, dead)
        return [bool(f) for f in flags]

    async def touch(self, consumer: str, entry_ids: Sequence[bytes | str]) -> int:
        if not entry_ids:
            return 0
        return int(await self._touch(keys=[self.spec.key], args=[self.spec.group, consumer, *entry_ids]))

    async def maybe_refresh_gauges(self, force: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        if force or now - self._gauges_at >= self.gauge_interval_s:
            self._gauges_at = now
            pipe = self.r.pipeline(transaction=False)
            pipe.xlen(self.spec.key)
            pipe.xinfo_groups(self.spec.key)
            try:
                xlen, groups = await pipe.execute()
            except ResponseError:
                return
            gauges(self.spec, xlen, groups)


class AsyncExperienceBuffer:
    """asyncio `ExperienceBuffer`: same methods, awaited."""

    def __init__(self, cfg: BufferConfig, client: aioredis.Redis | None = None):
        self.cfg = cfg
        self.keys = Keys.for_run(cfg.run_id)
        self._owns_client = client is None
        self.r = client or async_redis_from_url(cfg.redis)
        self.stream = AsyncGroupStream(self.r, ex.spec_for(cfg), cfg.put_batch, cfg.gauge_interval_s)

    @classmethod
    async def open(cls, cfg: BufferConfig, client: aioredis.Redis | None = None) -> AsyncExperienceBuffer:
        buf = cls(cfg, client)
        await buf.stream.setup()
        return buf

    async def put(self, records: Sequence[experience_pb2.Experience], timeout_s: float | None = None,
                  validate: bool = False) -> int:
        items = ex.to_fields(records, validate)
        if not items:
            return 0
        n = await self.stream.append(items, self.cfg.put_timeout_s if timeout_s is None else timeout_s)
        m.PUT_RECORDS.labels(ex.LABEL).inc(n)
        m.PUT_BYTES.labels(ex.LABEL).inc(sum(len(f[1]) for _, f in items))
        return n

    async def get(self, n: int, consumer: str, *, learner_version: int | None = None,
                  block_ms: int | None = None) -> ex.Batch:
        entries, reclaimed = await self.stream.read(
            consumer, n, self.cfg.block_ms if block_ms is None else block_ms)
        return await self._deliver(consumer, entries, reclaimed, learner_version)

    async def reclaim(self, n: int, consumer: str, *, learner_version: int | None = None) -> ex.Batch:
        entries = await self.stream.reclaim(consumer, n)
        return await self._deliver(consumer, entries, len(entries), learner_version)

    async def _deliver(self, consumer, entries, reclaimed, learner_version) -> ex.Batch:
        batch = ex.Batch(consumer, reclaimed=reclaimed)
        valid, drops, dead = ex.screen(entries)
        committed = (await self.r.hmget(self.keys.seen, [rec.sample_id for _, rec, _ in valid])
                     if valid else [])
        drops += ex.select(batch, valid, committed, learner_version, self.cfg)
        if drops or dead:
            await self.stream.settle(consumer, drops=drops, dead=dead)
        batch.dead_lettered = len(dead)
        ex.count_get(batch)
        return batch

    async def ack(self, batch: ex.Batch, *, tag: str = "", extra: Callable | None = None) -> list[bool]:
        commits = list(zip(batch.entry_ids, batch.sample_ids))
        flags = await self.stream.settle(batch.consumer, commits=commits, seen_key=self.keys.seen,
                                         token=ex.commit_token(batch, tag), extra=extra)
        m.DUPLICATES.labels(ex.LABEL).inc(flags.count(False))
        return flags

    async def touch(self, batch: ex.Batch) -> int:
        return await self.stream.touch(batch.consumer, batch.entry_ids)

    async def depth(self) -> int:
        return int(await self.r.xlen(self.keys.experience))

    async def close(self) -> None:
        if self._owns_client:
            await self.r.aclose()


class AsyncPromptQueue:
    """asyncio `PromptQueue`: same methods, awaited."""

    def __init__(self, cfg: BufferConfig, client: aioredis.Redis | None = None):
        self.cfg = cfg
        self.keys = Keys.for_run(cfg.run_id)
        self._owns_client = client is None
        self.r = client or async_redis_from_url(cfg.redis)
        self.stream = AsyncGroupStream(self.r, pr.spec_for(cfg), cfg.put_batch, cfg.gauge_interval_s)

    @classmethod
    async def open(cls, cfg: BufferConfig, client: aioredis.Redis | None = None) -> AsyncPromptQueue:
        q = cls(cfg, client)
        await q.stream.setup()
        return q

    async def put_prompts(self, prompts: Iterable[experience_pb2.PromptRecord], epoch: int,
                          timeout_s: float | None = None) -> int:
        items = pr.to_fields(prompts, epoch)
        if not items:
            return 0
        n = await self.stream.append(items, self.cfg.put_timeout_s if timeout_s is None else timeout_s,
                                     dedup_key=self.keys.prompts_queued(epoch))
        m.PUT_RECORDS.labels(pr.LABEL).inc(n)
        m.PUT_BYTES.labels(pr.LABEL).inc(sum(len(f[1]) for _, f in items) * n // len(items))
        return n

    async def claim(self, n: int, consumer: str, block_ms: int | None = None) -> pr.ClaimedPrompts:
        entries, reclaimed = await self.stream.read(
            consumer, n, self.cfg.block_ms if block_ms is None else block_ms)
        return await self._deliver(consumer, entries, reclaimed)

    async def reclaim(self, n: int, consumer: str) -> pr.ClaimedPrompts:
        entries = await self.stream.reclaim(consumer, n)
        return await self._deliver(consumer, entries, len(entries))

    async def _deliver(self, consumer, entries, reclaimed) -> pr.ClaimedPrompts:
        out, drops, dead = pr.screen(consumer, entries, reclaimed)
        if drops or dead:
            await self.stream.settle(consumer, drops=drops, dead=dead)
        return out

    async def ack(self, claimed: pr.ClaimedPrompts | Sequence[bytes | str]) -> None:
        ids = pr.entry_ids_of(claimed)
        if ids:
            await self.stream.settle("", drops=ids)

    async def touch(self, claimed: pr.ClaimedPrompts, entry_ids: Sequence[bytes] | None = None) -> int:
        return await self.stream.touch(claimed.consumer, entry_ids or claimed.entry_ids)

    async def forget_epoch(self, epoch: int) -> None:
        await self.r.delete(self.keys.prompts_queued(epoch))

    async def depth(self) -> int:
        return int(await self.r.xlen(self.keys.prompts))

    async def close(self) -> None:
        if self._owns_client:
            await self.r.aclose()
