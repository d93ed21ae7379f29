"""The experience stream: rollout replicas `put` records, the learner `get`s and `ack`s.

Delivery is at-least-once (an entry stays pending until acked and is reclaimed from a
consumer idle for `claim_idle_ms`); `ack` is the exactly-once commit point. In one Lua
script it marks each sample_id used in the run's `seen` hash (unless another commit holds
it), XACKs and XDELs the entries; `extra(pipeline)` may add the caller's own commands to
the same MULTI/EXEC (e.g. the learner's step counter). `get` never hands over a sample_id
that is already committed, so a redelivered or re-generated record is trained at most once.

Stream entry: one field `r` = the serialized `instructrl.v1.Experience` (CONVENTIONS: the
entry is the record; sample_id and policy_version are read from it).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis

from instructrl.buffer import metrics as m
from instructrl.buffer.config import BufferConfig, Keys
from instructrl.buffer.connection import redis_from_url
from instructrl.buffer.streams import Entry, GroupStream, StreamSpec
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
    duplicates: int = 0
    dead_lettered: int = 0
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
            drops.append(eid)
        elif b"r" not in fields:
            dead.append((eid, "decode", "entry has no 'r' field", b""))
        else:
            ids.append(eid)
            raws.append(fields[b"r"])
    for eid, raw, result in zip(ids, raws, screen_experiences(raws)):
        if isinstance(result, PoisonRecord):
            dead.append((eid, result.reason, result.detail, raw))
        else:
            valid.append((eid, result, len(raw)))
    return valid, drops, dead


def select(batch: Batch, valid, committed: Sequence, learner_version: int | None,
           cfg: BufferConfig) -> list[bytes]:
    """Fill `batch` with the valid records that are neither used nor stale; returns the
    entry ids to drop (duplicates, and stale records under stale_policy="drop")."""
    drops: list[bytes] = []
    taken: set[str] = set()
    for (eid, rec, nbytes), used in zip(valid, committed):
        if used is not None or rec.sample_id in taken:
            batch.duplicates += 1
            drops.append(eid)
            continue
        lag = 0 if learner_version is None else learner_version - rec.policy_version
        if cfg.max_policy_lag is not None and lag > cfg.max_policy_lag and cfg.stale_policy == "drop":
            batch.stale_dropped += 1
            drops.append(eid)
            continue
        taken.add(rec.sample_id)
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
    """Sync experience buffer (the learner's side; rollout replicas use `aio`)."""

    def __init__(self, cfg: BufferConfig, client: redis.Redis | None = None):
        self.cfg = cfg
        self.keys = Keys.for_run(cfg.run_id)
        self._owns_client = client is None
        self.r = client or redis_from_url(cfg.redis)
        self.stream = GroupStream(self.r, spec_for(cfg), cfg.put_batch, cfg.gauge_interval_s)

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
            block_ms: int | None = None) -> Batch:
        """Up to n valid, unused, fresh-enough records: entries idle at dead consumers
        first, then new ones, waiting up to block_ms (default buffer.block_ms; 0: do not
        wait) when there are none. Fewer, even none, come back on timeout or when some
        were dropped (duplicates, stale, poison: see the Batch counters). With
        learner_version, lags[i] = learner_version - policy_version and max_policy_lag
        applies; without it, lags are 0 and nothing is stale."""
        entries, reclaimed = self.stream.read(
            consumer, n, self.cfg.block_ms if block_ms is None else block_ms)
        return self._deliver(consumer, entries, reclaimed, learner_version)

    def reclaim(self, n: int, consumer: str, *, learner_version: int | None = None) -> Batch:
        """Take over now up to n entries idle at any consumer for claim_idle_ms (get also
        does this, every claim_idle_ms / 2)."""
        entries = self.stream.reclaim(consumer, n)
        return self._deliver(consumer, entries, len(entries), learner_version)

    def _deliver(self, consumer: str, entries: list[Entry], reclaimed: int,
                 learner_version: int | None) -> Batch:
        batch = Batch(consumer, reclaimed=reclaimed)
        valid, drops, dead = screen(entries)
        committed = self.r.hmget(self.keys.seen, [rec.sample_id for _, rec, _ in valid]) if valid else []
        drops += select(batch, valid, committed, learner_version, self.cfg)
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
        commits = list(zip(batch.entry_ids, batch.sample_ids))
        flags = self.stream.settle(batch.consumer, commits=commits, seen_key=self.keys.seen,
                                   token=commit_token(batch, tag), extra=extra)
        m.DUPLICATES.labels(LABEL).inc(flags.count(False))
        return flags

    def touch(self, batch: Batch) -> int:
        """Renew the consumer's lease on a batch it is still training on (call well within
        claim_idle_ms); returns how many entries it still owns."""
        return self.stream.touch(batch.consumer, batch.entry_ids)

    def depth(self) -> int:
        """Records not yet acked (undelivered + pending)."""
        return int(self.r.xlen(self.keys.experience))

    def refresh_gauges(self) -> None:
        self.stream.maybe_refresh_gauges(force=True)

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
    for eid, f in client.xrange(Keys.for_run(run_id).dead, count=count):
        out.append({"id": eid, **{k.decode(): (v if k == b"r" else v.decode()) for k, v in f.items()}})
    return out
