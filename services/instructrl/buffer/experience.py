"""The experience stream: rollout replicas `put` records, the learner `get`s and `ack`s.

Delivery is at-least-once (an entry stays pending until acked and is reclaimed from a
consumer idle for `claim_idle_ms`); `ack` is the exactly-once commit point. In one Lua
script it marks each sample_id used in the run's `seen` hash (unless another commit holds
it), XACKs and XDELs the entries; `extra(pipeline)` may add the caller's own commands to
the same MULTI/EXEC (e.g. the learner's step counter).

De-duplication lives here and only here: `get` never hands a consumer a sample_id that is
committed (the `seen` hash) or that this consumer already holds, delivered and not yet
acked (kept in memory per consumer, since a learner holds records until its checkpoint).
So a redelivered or re-generated record is trained at most once; the copy is acked away,
while the held original stays pending until its own ack (or is reclaimed after a crash).

Stream entry: one field `r` = the serialized `instructrl.v1.Experience` (CONVENTIONS: the
entry is the record; sample_id and policy_version are read from it).
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from instructrl.buffer import metrics as m
from instructrl.buffer.config import BufferConfig, Keys
from instructrl.buffer.connection import redis_from_url
from instructrl.buffer.pacing import STALE_POLICIES
from instructrl.buffer.streams import Drop, Entry, GroupStream, StreamSpec
from instructrl.buffer.validate import PoisonRecord, screen_experiences
from instructrl.v1 import experience_pb2

LABEL = "experience"


@dataclass
class Batch:
    """Records handed to one consumer by `get`; pass it back to `ack` once trained on.

    records[i] came from stream entry entry_ids[i] and is lags[i] = learner_version -
    policy_version versions old (0 when get had no learner_version).
    """

    consumer: str
    records: list[experience_pb2.Experience] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)
    lags: list[int] = field(default_factory=list)
    nbytes: int = 0
    stale_dropped: int = 0
    stale: list[experience_pb2.Experience] = field(default_factory=list)
    """The records dropped as stale (their prompts are to be queued again: `PromptQueue.requeue`)."""
    duplicates: int = 0
    dead_lettered: int = 0
    wrong_temperature: int = 0
    """Records refused (dead-lettered, reason "temperature") for another sampling temperature than asked."""
    reclaimed: int = 0
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """Identifies this batch's commit, so acking it again (a retry) is idempotent."""

    @property
    def sample_ids(self) -> list[str]:
        return [r.sample_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def spec_for(cfg: BufferConfig) -> StreamSpec:
    keys = Keys.for_run(cfg.run_id)
    return StreamSpec(keys.experience, cfg.experience_group, LABEL, keys.dead,
                      keys.reserved(keys.experience), cfg.capacity,
                      cfg.claim_idle_ms, cfg.max_deliveries, cfg.dead_letter_maxlen)


def to_fields(records: Sequence[experience_pb2.Experience], validate: bool) -> list[tuple[str, list]]:
    """Serialize records into PUT_LUA items; raise the first PoisonRecord when validating."""
    raws = [r.SerializeToString() for r in records]
    if validate:
        for result in screen_experiences(raws):
            if isinstance(result, PoisonRecord):
                raise result
    return [("", [b"r", raw]) for raw in raws]


def screen(entries: Sequence[Entry]):
    """Decode and validate entries -> (valid [(entry id, record, bytes)], drops, dead)."""
    valid, drops, dead = [], [], []
    ids, raws = [], []
    for eid, fields in entries:
        if fields is None:  # deleted while pending
            drops.append((eid, "gone"))
        elif b"r" not in fields:
            dead.append((eid, "decode", "entry has no 'r' field", b""))
        else:
            ids.append(eid)
            raws.append(fields[b"r"])
    for eid, raw, result in zip(ids, raws, screen_experiences(raws), strict=True):
        if isinstance(result, PoisonRecord):
            dead.append((eid, result.reason, result.detail, raw))
        else:
            valid.append((eid, result, len(raw)))
    return valid, drops, dead


def record_temperature(rec: experience_pb2.Experience) -> float:
    """The sampling temperature a record was drawn at (unset, from before the field existed: 1)."""
    return rec.temperature or 1.0


def wrong_temperature(rec: experience_pb2.Experience, temperature: float | None) -> bool:
    """True when `temperature` is asked for (> 0) and the record was sampled at another (float32 in
    the record: compared to 1e-6 relative)."""
    return temperature is not None and temperature > 0 and not math.isclose(
        record_temperature(rec), temperature, rel_tol=1e-6)


def select(batch: Batch, valid, committed: Sequence, held: dict[str, bytes], learner_version: int | None,
           max_policy_lag: int | None, stale_policy: str, temperature: float | None = None,
           dead: list | None = None) -> list[Drop]:
    """Fill `batch` with the valid records that are neither used, held, stale nor of another
    temperature (adding them to `held`, sample_id -> entry id); returns the entries to drop with
    their reason (copies of used or held sample_ids, and stale records under stale_policy="drop").
    Records of another temperature than `temperature` (None/0: any) go to `dead`, reason
    "temperature"."""
    drops: list[Drop] = []
    for (eid, rec, nbytes), used in zip(valid, committed, strict=True):
        sid = rec.sample_id
        if used is not None or sid in held:
            batch.duplicates += 1
            if held.get(sid) != eid:  # not the held entry itself, redelivered: drop the copy
                drops.append((eid, "duplicate"))
            continue
        if dead is not None and wrong_temperature(rec, temperature):
            batch.wrong_temperature += 1
            dead.append((eid, "temperature", f"sampled at temperature {record_temperature(rec):.6g}, the learner "
                         f"trains at {temperature:.6g}", rec.SerializeToString()))
            continue
        lag = 0 if learner_version is None else learner_version - rec.policy_version
        if max_policy_lag is not None and lag > max_policy_lag and stale_policy == "drop":
            batch.stale_dropped += 1
            batch.stale.append(rec)
            drops.append((eid, "stale"))
            continue
        held[sid] = eid
        batch.records.append(rec)
        batch.entry_ids.append(eid)
        batch.lags.append(lag)
        batch.nbytes += nbytes
    return drops


def count_get(batch: Batch) -> None:
    m.GET_RECORDS.labels(LABEL).inc(len(batch.records))
    m.GET_BYTES.labels(LABEL).inc(batch.nbytes)
    m.STALE_DROPPED.labels(LABEL).inc(batch.stale_dropped)
    m.DUPLICATES.labels(LABEL).inc(batch.duplicates)


def commit_token(batch: Batch, tag: str) -> str:
    """Value stored in `seen` for each committed sample: who, which step, which batch."""
    return f"{batch.consumer}|{tag}|{batch.token}"


class ExperienceBuffer:
    """The experience stream's client: rollout workers `put` (from their event loop through
    `asyncio.to_thread`), the learner `get`s, `touch`es and `ack`s. Thread-safe for that use."""

    def __init__(self, cfg: BufferConfig, client: redis.Redis | None = None):
        self.cfg = cfg
        self.keys = Keys.for_run(cfg.run_id)
        self._owns_client = client is None
        self.r = client or redis_from_url(cfg.redis)
        self.stream = GroupStream(self.r, spec_for(cfg), cfg.put_batch, cfg.gauge_interval_s)
        self._held: dict[str, dict[str, bytes]] = {}  # consumer -> sample_id -> entry id, until acked

    @classmethod
    def open(cls, cfg: BufferConfig, client: redis.Redis | None = None) -> ExperienceBuffer:
        """Connect and create the stream and the learner group (so KEDA can see it)."""
        buf = cls(cfg, client)
        buf.stream.setup()
        return buf

    def put(self, records: Sequence[experience_pb2.Experience], timeout_s: float | None = None,
            validate: bool = False) -> int:
        """Append records, waiting up to timeout_s (default put_timeout_s) for room.
        Raises BufferFull when the stream stays at capacity. Consumers validate every
        record they read; validate=True also checks here and raises PoisonRecord before
        anything is appended (fail fast in tests and debugging; costs ~15 us a record)."""
        items = to_fields(records, validate)
        if not items:
            return 0
        n = self.stream.append(items, self.cfg.put_timeout_s if timeout_s is None else timeout_s)
        m.PUT_RECORDS.labels(LABEL).inc(n)
        m.PUT_BYTES.labels(LABEL).inc(sum(len(f[1]) for _, f in items))
        return n

    def get(self, n: int, consumer: str, *, learner_version: int | None = None,
            max_policy_lag: int | None = None, stale_policy: str = "drop",
            block_ms: int | None = None, temperature: float | None = None) -> Batch:
        """Up to n valid, unused, fresh-enough records: entries idle at dead consumers
        first, then new ones, waiting up to block_ms (default buffer.block_ms; 0: do not
        wait) when there are none. Fewer, even none, come back on timeout or when some
        were dropped (duplicates, stale, poison: see the Batch counters). With
        learner_version, lags[i] = learner_version - policy_version, and records with a
        lag over max_policy_lag (None: no limit) are dropped or kept per stale_policy (the
        learner's `pacing.*`); without it, lags are 0 and nothing is stale. With `temperature`
        (> 0), records sampled at another temperature are dead-lettered (reason "temperature",
        counted in `Batch.wrong_temperature`)."""
        if stale_policy not in STALE_POLICIES:
            raise ValueError(f"stale_policy: {stale_policy!r} is not drop/keep")
        entries, reclaimed = self.stream.read(
            consumer, n, self.cfg.block_ms if block_ms is None else block_ms)
        return self._deliver(consumer, entries, reclaimed, learner_version, max_policy_lag, stale_policy,
                             temperature)

    def reclaim(self, n: int, consumer: str, *, learner_version: int | None = None,
                max_policy_lag: int | None = None, stale_policy: str = "drop") -> Batch:
        """Take over now up to n entries idle at any consumer for claim_idle_ms (get also
        does this, every claim_idle_ms / 2)."""
        entries = self.stream.reclaim(consumer, n)
        return self._deliver(consumer, entries, len(entries), learner_version, max_policy_lag, stale_policy)

    def _deliver(self, consumer: str, entries: list[Entry], reclaimed: int, learner_version: int | None,
                 max_policy_lag: int | None, stale_policy: str, temperature: float | None = None) -> Batch:
        batch = Batch(consumer, reclaimed=reclaimed)
        valid, drops, dead = screen(entries)
        committed = self.r.hmget(self.keys.seen, [rec.sample_id for _, rec, _ in valid]) if valid else []
        held = self._held.setdefault(consumer, {})
        drops += select(batch, valid, committed, held, learner_version, max_policy_lag, stale_policy, temperature,
                        dead)
        if drops or dead:
            self.stream.settle(consumer, drops=drops, dead=dead)
        batch.dead_lettered = len(dead)
        count_get(batch)
        return batch

    def ack(self, batch: Batch, *, tag: str = "", extra: Callable | None = None) -> list[bool]:
        """Commit `batch` as trained on: per record, mark its sample_id used, XACK, XDEL,
        atomically (plus `extra(pipeline)` in the same transaction). Acking the same batch
        again with the same tag is a no-op returning the same flags. Returns per record
        True if this batch holds the commit, False if another consumer committed the same
        sample_id first (it was trained twice in memory; count it out)."""
        commits = list(zip(batch.entry_ids, batch.sample_ids, strict=True))
        flags = self.stream.settle(batch.consumer, commits=commits, seen_key=self.keys.seen,
                                   token=commit_token(batch, tag), extra=extra)
        m.DUPLICATES.labels(LABEL).inc(flags.count(False))
        held = self._held.get(batch.consumer, {})
        for eid, sid in commits:
            if held.get(sid) == eid:
                del held[sid]
        return flags

    def touch(self, batch: Batch) -> int:
        """Renew the consumer's lease on a batch it is still training on (call well within
        claim_idle_ms); returns how many entries it still owns."""
        return self.stream.touch(batch.consumer, batch.entry_ids)

    def depth(self) -> int:
        """Records not yet acked (undelivered + pending)."""
        return int(self.r.xlen(self.keys.experience))

    def refresh_gauges(self, force: bool = True) -> None:
        """Export the run-wide gauges of this stream (only learner rank 0 calls this)."""
        self.stream.maybe_refresh_gauges(force=force)

    def close(self) -> None:
        """Close the client, unless it was passed in."""
        if self._owns_client:
            self.r.close()

    def __enter__(self) -> ExperienceBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_dead_letters(client: redis.Redis, run_id: str, count: int = 100) -> list[dict]:
    """The oldest `count` dead letters: reason, detail, raw record bytes, source entry."""
    out = []
    for eid, f in cast(Any, client.xrange(Keys.for_run(run_id).dead, count=count)):
        out.append({"id": eid, **{k.decode(): (v if k == b"r" else v.decode()) for k, v in f.items()}})
    return out
