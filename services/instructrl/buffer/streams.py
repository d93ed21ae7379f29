"""One Redis stream read through one consumer group: the logic the prompt queue and the
experience buffer share.

Invariant that bounds memory without trimming unread data: an entry leaves the stream
(XDEL) only in the same Lua script that XACKs it. So XLEN == entries not yet acked
(undelivered + pending). `capacity` bounds the undelivered ones (XLEN - pending): a
consumer that holds delivered records until its checkpoint does not stall producers, and
the stream holds at most capacity + what consumers hold. The group's `lag` stays exact
because nothing after its last-delivered id is ever deleted.

One synchronous implementation serves every caller: the learner calls it directly, the
rollout workers from their event loop through `asyncio.to_thread` (the redis client's
connection pool makes concurrent calls from threads safe).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import ResponseError

from instructrl.buffer import metrics as m
from instructrl.buffer.config import Keys
from instructrl.buffer.scripts import PUT_LUA, RESERVE_LUA, RESERVE_TTL_MS, SETTLE_LUA, TOUCH_LUA

log = logging.getLogger(__name__)

SETTLE_CHUNK = 1000  # entries per script call (Lua's unpack limit is far above)

Entry = tuple[bytes, "dict[bytes, bytes] | None"]  # (entry id, fields); fields None if deleted
Dead = tuple[bytes, str, str, bytes]  # (entry id, reason, detail, raw record)
Drop = tuple[bytes, str]  # (entry id, reason: "stale", "duplicate", "done", "gone" = deleted while pending)


class BufferFull(TimeoutError):
    """A producer waited `put_timeout_s` and the stream stayed at capacity."""


@dataclass
class StreamSpec:
    """A stream, its group, and the limits that apply to it."""

    key: str
    group: str
    label: str  # metrics label: "prompts" | "experience"
    dead_key: str
    reserved_key: str
    capacity: int
    claim_idle_ms: int
    max_deliveries: int
    dead_maxlen: int

    @property
    def outcomes_key(self) -> str:
        return Keys.outcomes(self.key)


def put_args(spec: StreamSpec, records: Sequence[tuple[str, Sequence[bytes | str | int]]]) -> list:
    """ARGV of PUT_LUA (with dedup) for records given as (member, flat field/value list)."""
    k = len(records[0][1]) // 2
    args: list = [spec.capacity, k, spec.group]
    for member, fields in records:
        assert len(fields) == 2 * k, "every record needs the same fields"
        args.append(member)
        args.extend(fields)
    return args


def settle_args(spec: StreamSpec, consumer: str, token: str,
                commits: Sequence[tuple[bytes, str]], drops: Sequence[Drop],
                dead: Sequence[Dead]) -> list:
    """ARGV of SETTLE_LUA."""
    args: list = [spec.group, token, spec.dead_maxlen, len(commits), len(drops), len(dead)]
    for eid, sid in commits:
        args += [eid, sid]
    for eid, reason in drops:
        args += [eid, reason]
    for eid, reason, detail, raw in dead:
        args += [eid, reason, detail[:500], raw, consumer]
    return args


def settle_chunks(commits: Sequence, drops: Sequence, dead: Sequence):
    """Split one settlement into script calls of at most SETTLE_CHUNK entries."""
    c, d, x = list(commits), list(drops), list(dead)
    while c or d or x:
        cc, c = c[:SETTLE_CHUNK], c[SETTLE_CHUNK:]
        room = SETTLE_CHUNK - len(cc)
        dd, d = d[:room], d[room:]
        room -= len(dd)
        xx, x = x[:room], x[room:]
        yield cc, dd, xx


def over_delivered(spec: StreamSpec, entries: list[Entry], pending_replies) -> tuple[list[Entry], list[Dead]]:
    """Split reclaimed entries into those to hand over and those delivered too often."""
    keep: list[Entry] = []
    dead: list[Dead] = []
    for (eid, fields), info in zip(entries, pending_replies, strict=True):
        times = info[0]["times_delivered"] if info else 0
        if times > spec.max_deliveries:
            raw = (fields or {}).get(b"r", b"")
            dead.append((eid, "max_deliveries", f"delivered {times} times", raw))
        else:
            keep.append((eid, fields))
    return keep, dead


class Clock:
    """When the next XAUTOCLAIM pass is due: every claim_idle_ms / 2 (0.05..5 s), or at
    once after a pass that came back full."""

    def __init__(self, claim_idle_ms: int):
        self.interval = min(max(claim_idle_ms / 2000, 0.05), 5.0)
        self.next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next

    def done(self, full: bool) -> None:
        self.next = time.monotonic() + (0.0 if full else self.interval)


class Waiter:
    """Backoff schedule of a producer waiting for room: 2 ms doubling to 100 ms."""

    def __init__(self, timeout_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.delay = 0.002
        self.slept = False

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next try, or None when the deadline passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        d, self.delay = min(self.delay, left), min(self.delay * 2, 0.1)
        self.slept = True
        return d

    def waited(self) -> float:
        return time.monotonic() - self.start


def full_error(spec: StreamSpec, depth: int, waited: float) -> BufferFull:
    return BufferFull(
        f"{spec.label} stream {spec.key} is full: {depth} records not yet delivered, capacity "
        f"{spec.capacity}; waited {waited:.1f}s for a consumer to read (raise capacity or "
        f"put_timeout_s, or check that the consumer group {spec.group!r} is running)")


def gauges(spec: StreamSpec, xlen: int, groups) -> None:
    """Set depth / pending / consumer_lag from XLEN and XINFO GROUPS."""
    info = next((g for g in groups if g["name"] in (spec.group, spec.group.encode())), None)
    pending = int(info["pending"]) if info else 0
    lag = info.get("lag") if info else None
    m.DEPTH.labels(spec.label).set(xlen)
    m.PENDING.labels(spec.label).set(pending)
    m.CONSUMER_LAG.labels(spec.label).set(lag if lag is not None else max(xlen - pending, 0))


class GroupStream:
    """Sync I/O on one stream + group: append with backpressure, read with reclaim,
    settle (ack + delete, commit, dead-letter) atomically, renew leases, gauges."""

    def __init__(self, client: redis.Redis, spec: StreamSpec, put_batch: int, gauge_interval_s: float):
        self.r, self.spec = client, spec
        self.put_batch = min(put_batch, spec.capacity)
        self.gauge_interval_s = gauge_interval_s
        self._put = client.register_script(PUT_LUA)
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        self._touch = client.register_script(TOUCH_LUA)
        self._clock = Clock(spec.claim_idle_ms)
        self._cursor: bytes | str = "0-0"
        self._own_cursor: dict[str, bytes | str | None] = {}  # consumer -> where its PEL read is (None: done)
        self._gauges_at = 0.0

    def setup(self) -> None:
        """Create the stream and its group (from id 0: nothing appended earlier is skipped)."""
        m.BACKPRESSURE_WAIT.labels(self.spec.label)  # a series from the start, not from the first wait
        try:
            self.r.xgroup_create(self.spec.key, self.spec.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def append(self, records, timeout_s: float, dedup_key: str | None = None) -> int:
        """Append records = [(dedup member, fields)], waiting for room; returns appended.
        With dedup_key, members already in that set are skipped (PUT_LUA)."""
        appended = 0
        for i in range(0, len(records), self.put_batch):
            chunk = records[i:i + self.put_batch]
            waiter = Waiter(timeout_s)
            while True:
                n, depth = self._try_append(chunk, dedup_key)
                if n >= 0:
                    break
                delay = waiter.next_delay()
                if delay is None:
                    m.BACKPRESSURE_WAIT.labels(self.spec.label).observe(waiter.waited())
                    raise full_error(self.spec, depth, waiter.waited())
                time.sleep(delay)
            if waiter.slept:
                m.BACKPRESSURE_WAIT.labels(self.spec.label).observe(waiter.waited())
            appended += n
        return appended

    def _try_append(self, chunk, dedup_key: str | None) -> tuple[int, int]:
        if dedup_key is not None:
            return self._put(keys=[self.spec.key, dedup_key, self.spec.reserved_key], args=put_args(self.spec, chunk))
        member = f"{len(chunk)}:{uuid.uuid4().hex[:16]}"  # RESERVE_LUA's "n:random"
        n, depth = self._reserve(keys=[self.spec.key, self.spec.reserved_key],
                                 args=[self.spec.capacity, len(chunk), member, RESERVE_TTL_MS,
                                       self.spec.group])
        if n >= 0:
            pipe = self.r.pipeline(transaction=False)
            for _, fields in chunk:
                pipe.xadd(self.spec.key, dict(zip(fields[::2], fields[1::2], strict=True)))
            pipe.zrem(self.spec.reserved_key, member)
            pipe.execute()
        return n, depth

    def read(self, consumer: str, n: int, block_ms: int | None) -> tuple[list[Entry], int]:
        """Up to n entries: first (once per consumer and process) what an earlier process of the
        same consumer name left pending, then idle ones reclaimed from other consumers (when
        a pass is due), then new ones. Returns (entries, how many were reclaimed or taken
        back). block_ms 0/None: do not block."""
        try:
            entries = self._own_pending(consumer, n)
            if len(entries) < n and self._clock.due():
                entries += self.reclaim(consumer, n - len(entries))
            reclaimed = len(entries)
            if len(entries) < n:
                block = None if entries or not block_ms else block_ms
                reply = cast(Any, self.r.xreadgroup(self.spec.group, consumer, {self.spec.key: ">"},
                                                    count=n - len(entries), block=block))
                entries += [(eid, fields) for eid, fields in reply[0][1]] if reply else []
        except ResponseError as err:
            if not str(err).startswith("NOGROUP"):
                raise
            log.warning("group %s on %s vanished (Redis lost its data?); recreating it",
                        self.spec.group, self.spec.key)
            self.setup()
            return [], 0
        return entries, reclaimed

    def _own_pending(self, consumer: str, n: int) -> list[Entry]:
        """A restarted consumer (same name) takes back what it held at once, rather than after
        claim_idle_ms: its pending-entries list, read from the start (XREADGROUP with id 0)."""
        cursor = self._own_cursor.get(consumer, "0")
        if cursor is None:
            return []
        reply = cast(Any, self.r.xreadgroup(self.spec.group, consumer, {self.spec.key: cursor}, count=n))
        entries = [(eid, fields or None) for eid, fields in reply[0][1]] if reply else []
        self._own_cursor[consumer] = entries[-1][0] if len(entries) == n else None
        return entries

    def reclaim(self, consumer: str, n: int) -> list[Entry]:
        """XAUTOCLAIM up to n entries idle for claim_idle_ms; over-delivered ones go to the
        dead-letter stream."""
        reply = self.r.xautoclaim(self.spec.key, self.spec.group, consumer,
                                  self.spec.claim_idle_ms, self._cursor, count=n)
        self._cursor, claimed = reply[0], [(eid, f) for eid, f in reply[1]]
        self._clock.done(full=len(claimed) >= n)
        if not claimed:
            return []
        m.RECLAIMED.labels(self.spec.label).inc(len(claimed))
        pipe = self.r.pipeline(transaction=False)
        for eid, _ in claimed:
            pipe.xpending_range(self.spec.key, self.spec.group, eid, eid, 1)
        keep, dead = over_delivered(self.spec, claimed, pipe.execute())
        if dead:
            self.settle(consumer, dead=dead)
        return keep

    def settle(self, consumer: str, *, commits: Sequence[tuple[bytes, str]] = (),
               drops: Sequence[Drop] = (), dead: Sequence[Dead] = (), seen_key: str | None = None,
               token: str = "", extra: Callable | None = None) -> list[bool]:
        """Ack and delete entries atomically with their commit (sample marked used in
        `seen_key`) or their dead-letter copy, each counted under its reason in the stream's
        outcomes hash. `extra(pipeline)` may queue more commands into the same MULTI/EXEC.
        Returns one flag per commit (True = ours)."""
        keys = [self.spec.key, seen_key or self.spec.key, self.spec.dead_key, self.spec.outcomes_key]
        chunks = list(settle_chunks(commits, drops, dead))
        if not chunks and extra is None:
            return []
        if extra is None and len(chunks) == 1:
            flags = self._settle(keys=keys, args=settle_args(self.spec, consumer, token, *chunks[0]))
        else:  # one transaction; EVAL (not EVALSHA) so NOSCRIPT cannot split it
            pipe = self.r.pipeline(transaction=True)
            for chunk in chunks:
                pipe.eval(SETTLE_LUA, len(keys), *keys, *settle_args(self.spec, consumer, token, *chunk))
            if extra is not None:
                extra(pipe)
            results = pipe.execute()
            flags = [f for r in results[:len(chunks)] for f in r]
        for _, reason, _, _ in dead:
            m.DEAD_LETTERS.labels(self.spec.label, reason).inc()
        return [bool(f) for f in flags]

    def touch(self, consumer: str, entry_ids: Sequence[bytes | str]) -> int:
        """Renew this consumer's lease on entries it still owns; returns how many it owns."""
        if not entry_ids:
            return 0
        return int(self._touch(keys=[self.spec.key], args=[self.spec.group, consumer, *entry_ids]))

    def maybe_refresh_gauges(self, force: bool = False) -> None:
        """Set the run-wide depth / pending / lag gauges (at most every gauge_interval_s). One
        process of a run exports them (learner rank 0), so dashboards never sum copies."""
        now = time.monotonic()
        if force or now - self._gauges_at >= self.gauge_interval_s:
            self._gauges_at = now
            pipe = self.r.pipeline(transaction=False)
            pipe.xlen(self.spec.key)
            pipe.xinfo_groups(self.spec.key)
            try:
                xlen, groups = pipe.execute()
            except ResponseError:  # stream gone: setup() recreates it on the next read
                return
            gauges(self.spec, xlen, groups)
