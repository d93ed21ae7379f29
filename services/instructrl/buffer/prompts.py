"""The prompt stream: the launcher queues an epoch's prompts, rollout
replicas claim them through the `rollout` group and ack each once its experience is in
the experience stream.

Guarantees: `put_prompts` is idempotent per (epoch, prompt_id) (a set of queued ids per
epoch), so a restarted loader does not queue a prompt twice; a prompt whose samples the
learner dropped as stale is queued again (`requeue`), so it is not lost for the epoch; a claimed prompt stays
pending until acked and is reclaimed by another replica after `claim_idle_ms` when its
holder dies. A replica that dies after writing experience but before acking re-generates
the prompt elsewhere; use a deterministic sample_id (`sample_id_for`) and the experience
consumer's dedup keeps the training exactly-once.

Stream entry fields: `r` = serialized `instructrl.v1.PromptRecord`, `id` = prompt_id,
`e` = epoch.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import redis

from instructrl.buffer import metrics as m
from instructrl.buffer.config import BufferConfig, Keys
from instructrl.buffer.connection import redis_from_url
from instructrl.buffer.streams import Entry, GroupStream, StreamSpec
from instructrl.buffer.validate import PoisonRecord, check_prompt
from instructrl.v1 import experience_pb2

LABEL = "prompts"
log = logging.getLogger(__name__)


def sample_id_for(prompt_id: str, epoch: int, sample_index: int) -> str:
    """The deterministic sample_id of the sample_index-th response to a prompt in an epoch,
    so a re-generated sample has the id of the one it repeats."""
    return f"{prompt_id}/e{int(epoch)}/s{int(sample_index)}"


@dataclass
class ClaimedPrompts:
    """Prompts handed to one rollout replica; ack each once its experience is written."""

    consumer: str
    prompts: list[experience_pb2.PromptRecord] = field(default_factory=list)
    entry_ids: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def spec_for(cfg: BufferConfig) -> StreamSpec:
    keys = Keys.for_run(cfg.run_id)
    return StreamSpec(keys.prompts, cfg.prompt_group, LABEL, keys.dead,
                      keys.reserved(keys.prompts), cfg.prompt_capacity,
                      cfg.claim_idle_ms, cfg.max_deliveries, cfg.dead_letter_maxlen)


def to_fields(prompts: Iterable[experience_pb2.PromptRecord], epoch: int) -> list[tuple[str, list]]:
    items = []
    for p in prompts:
        rec = experience_pb2.PromptRecord()
        rec.CopyFrom(p)
        rec.epoch = epoch
        raw = rec.SerializeToString()
        check_prompt(raw)
        items.append((rec.prompt_id, [b"r", raw, b"id", rec.prompt_id, b"e", epoch]))
    return items


def screen(consumer: str, entries: Sequence[Entry], reclaimed: int):
    """Decode and validate entries -> (ClaimedPrompts, drops, dead)."""
    out = ClaimedPrompts(consumer, reclaimed=reclaimed)
    drops, dead = [], []
    for eid, fields in entries:
        if fields is None:
            drops.append((eid, "gone"))
            continue
        raw = fields.get(b"r")
        try:
            if raw is None:
                raise PoisonRecord("decode", "entry has no 'r' field")
            out.prompts.append(check_prompt(raw))
            out.entry_ids.append(eid)
            out.nbytes += len(raw)
        except PoisonRecord as err:
            dead.append((eid, err.reason, err.detail, raw or b""))
    out.dead_lettered = len(dead)
    m.GET_RECORDS.labels(LABEL).inc(len(out))
    m.GET_BYTES.labels(LABEL).inc(out.nbytes)
    return out, drops, dead


def entry_ids_of(claimed: ClaimedPrompts | Sequence[bytes | str]) -> list:
    return list(claimed.entry_ids if isinstance(claimed, ClaimedPrompts) else claimed)


class PromptQueue:
    """The prompt stream's client: the launcher queues, rollout workers claim, touch and ack
    (from their event loop through `asyncio.to_thread`)."""

    def __init__(self, cfg: BufferConfig, client: redis.Redis | None = None):
        self.cfg = cfg
        self.keys = Keys.for_run(cfg.run_id)
        self._owns_client = client is None
        self.r = client or redis_from_url(cfg.redis)
        self.stream = GroupStream(self.r, spec_for(cfg), cfg.put_batch, cfg.gauge_interval_s)

    @classmethod
    def open(cls, cfg: BufferConfig, client: redis.Redis | None = None) -> PromptQueue:
        """Connect and create the stream and the rollout group (so KEDA can see it)."""
        q = cls(cfg, client)
        q.stream.setup()
        return q

    def put_prompts(self, prompts: Iterable[experience_pb2.PromptRecord], epoch: int,
                    timeout_s: float | None = None) -> int:
        """Queue the prompts of `epoch` (setting their epoch field); prompt_ids already
        queued in this epoch are skipped. Waits for room up to timeout_s (default
        put_timeout_s), then raises BufferFull. Returns how many were queued.

        Each prompt is also kept once per run (`Keys.prompt_records`), so that one whose
        samples all arrived too stale to train on can be queued again (`requeue`)."""
        items = to_fields(prompts, epoch)
        if not items:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for member, fields in items:
            pipe.hsetnx(self.keys.prompt_records, member, fields[1])
        pipe.execute()
        return self._append(items, epoch, timeout_s)

    def requeue(self, stale: Iterable[experience_pb2.Experience], timeout_s: float | None = None) -> int:
        """Queue again the prompts of records dropped as stale, once per (prompt, epoch, generating
        version): their samples are generated anew (with the same sample_ids, so those already
        trained are dropped as duplicates). Returns how many prompts were queued."""
        by_epoch: dict[int, dict[str, int]] = {}
        for rec in stale:
            by_epoch.setdefault(rec.epoch, {}).setdefault(rec.prompt_id, rec.policy_version)
        n = 0
        for epoch, prompts in by_epoch.items():
            raws = self.r.hmget(self.keys.prompt_records, list(prompts))
            items = []
            for (pid, version), raw in zip(prompts.items(), raws, strict=True):
                if raw is None:
                    log.warning("prompt %s was not queued through put_prompts: cannot queue it again", pid)
                    continue
                rec = experience_pb2.PromptRecord.FromString(raw)
                rec.epoch = epoch
                items.append((f"{pid}@stale-v{version}", [b"r", rec.SerializeToString(), b"id", pid, b"e", epoch]))
            if items:
                n += self._append(items, epoch, timeout_s)
        m.REQUEUED.labels(LABEL).inc(n)
        return n

    def _append(self, items: list, epoch: int, timeout_s: float | None) -> int:
        n = self.stream.append(items, self.cfg.put_timeout_s if timeout_s is None else timeout_s,
                               dedup_key=self.keys.prompts_queued(epoch))
        m.PUT_RECORDS.labels(LABEL).inc(n)
        # bytes of the call scaled by the share appended (skipped repeats are not known by id)
        m.PUT_BYTES.labels(LABEL).inc(sum(len(f[1]) for _, f in items) * n // len(items))
        return n

    def claim(self, n: int, consumer: str, block_ms: int | None = None) -> ClaimedPrompts:
        """Up to n prompts for `consumer`: idle ones of dead replicas first, then new ones."""
        entries, reclaimed = self.stream.read(
            consumer, n, self.cfg.block_ms if block_ms is None else block_ms)
        return self._deliver(consumer, entries, reclaimed)

    def reclaim(self, n: int, consumer: str) -> ClaimedPrompts:
        """Take over now up to n prompts idle at any replica for claim_idle_ms."""
        entries = self.stream.reclaim(consumer, n)
        return self._deliver(consumer, entries, len(entries))

    def _deliver(self, consumer: str, entries: list[Entry], reclaimed: int) -> ClaimedPrompts:
        out, drops, dead = screen(consumer, entries, reclaimed)
        if drops or dead:
            self.stream.settle(consumer, drops=drops, dead=dead)
        return out

    def ack(self, claimed: ClaimedPrompts | Sequence[bytes | str]) -> None:
        """Mark prompts done (XACK + XDEL in one script): call after their experience is put."""
        ids = entry_ids_of(claimed)
        if ids:
            self.stream.settle("", drops=[(eid, "done") for eid in ids])

    def release(self, claimed: ClaimedPrompts) -> None:
        """Give prompts back now (a draining replica): they stay pending at this consumer but
        look idle for claim_idle_ms, so the next reclaim pass of any replica takes them."""
        ids = entry_ids_of(claimed)
        if ids:
            self.r.xclaim(self.keys.prompts, self.cfg.prompt_group, claimed.consumer, 0, ids,
                          idle=self.cfg.claim_idle_ms, justid=True)

    def fail(self, claimed: ClaimedPrompts, detail: str) -> int:
        """Give back prompts whose work failed for good: each is released for redelivery (as
        `release`), or, once delivered `max_deliveries` times, moved to the dead-letter stream
        with reason `failed` and `detail` (the error). Returns how many were dead-lettered."""
        ids = entry_ids_of(claimed)
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(self.keys.prompts, self.cfg.prompt_group, eid, eid, 1)
        dead, again = [], []
        for eid, rec, info in zip(ids, claimed.prompts, pipe.execute(), strict=True):
            if info and info[0]["times_delivered"] >= self.cfg.max_deliveries:
                dead.append((eid, "failed", detail, rec.SerializeToString()))
            elif info:  # still pending at this consumer (not taken over meanwhile)
                again.append(eid)
        if dead:
            self.stream.settle(claimed.consumer, dead=dead)
        if again:
            self.release(ClaimedPrompts(claimed.consumer, entry_ids=again))
        return len(dead)

    def touch(self, claimed: ClaimedPrompts, entry_ids: Sequence[bytes] | None = None) -> int:
        """Renew the lease on prompts still being generated; returns how many are still ours."""
        return self.stream.touch(claimed.consumer, entry_ids or claimed.entry_ids)

    def depth(self) -> int:
        """Prompts not yet acked (undelivered + being generated)."""
        return int(self.r.xlen(self.keys.prompts))

    def refresh_gauges(self, force: bool = True) -> None:
        """Export the run-wide gauges of this stream (only learner rank 0 calls this)."""
        self.stream.maybe_refresh_gauges(force=force)

    def close(self) -> None:
        """Close the client, unless it was passed in."""
        if self._owns_client:
            self.r.close()

    def __enter__(self) -> PromptQueue:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
