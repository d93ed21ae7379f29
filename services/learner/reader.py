"""Rank 0's side of the experience buffer: fill a batch, hold it, commit it after a checkpoint.

Exactly-once (docs/learner.md): records are acked (`ExperienceBuffer.ack`, which marks
their sample_ids used in Redis, atomically with XACK) only after a checkpoint that
includes their update is on disk. Until then they stay pending at this consumer; their
leases are renewed (`touch`) so that nobody reclaims them, and their sample_ids are kept
in memory so that a redelivered copy is not trained twice. The checkpoint lists them
(`uncommitted()`), and a restarted learner acks that list first (`commit_saved`), so a
kill between "checkpoint written" and "acked" cannot train them again. A kill before
the checkpoint leaves them pending: they are reclaimed (XAUTOCLAIM) after
`buffer.claim_idle_ms` and trained once by the restored, older model.
"""
from __future__ import annotations

import logging
from typing import Callable

from instructrl.buffer import Batch, ExperienceBuffer
from instructrl.learner.batch import fresh_records
from instructrl.v1 import experience_pb2

log = logging.getLogger(__name__)


class ExperienceReader:
    """Fills batches of `batch_size` fresh records from the buffer (rank 0 only)."""

    def __init__(self, buffer: ExperienceBuffer, consumer: str, batch_size: int):
        self.buffer, self.consumer, self.batch_size = buffer, consumer, batch_size
        self._pool: list[experience_pb2.Experience] = []  # fresh records of the batch being filled
        self._pool_lags: list[int] = []
        self._filling: list[Batch] = []  # buffer batches the pool came from
        self._taken: list[Batch] = []  # buffer batches handed to training, not yet acked
        self._seen: set[str] = set()  # sample_ids read and not yet committed
        self.stale_dropped = 0
        self.duplicates = 0

    def fill(self, learner_version: int, interrupted: Callable[[], bool]) -> tuple[list, list[int]] | None:
        """Block until `batch_size` fresh records are read; None if `interrupted()` first.

        Returns the records and their policy lags. Stale records are dropped (or kept with
        their lag) by the buffer per `buffer.max_policy_lag` / `stale_policy`; records whose
        sample_id was used already are dropped by the buffer (committed) or here (held).
        """
        while len(self._pool) < self.batch_size:
            if interrupted():
                return None
            self.touch()
            got = self.buffer.get(self.batch_size - len(self._pool), self.consumer,
                                  learner_version=learner_version)
            self.stale_dropped += got.stale_dropped
            self.duplicates += got.duplicates
            if got.entry_ids:
                self._filling.append(got)
            records, lags = fresh_records(got.records, got.lags, self._seen)
            self.duplicates += len(got.records) - len(records)
            self._pool += records
            self._pool_lags += lags
        records, lags = self._pool, self._pool_lags
        self._pool, self._pool_lags = [], []
        self._taken += self._filling
        self._filling = []
        return records, lags

    def touch(self) -> None:
        """Renew this consumer's lease on every batch it holds."""
        for b in self._taken + self._filling:
            self.buffer.touch(b)

    def uncommitted(self) -> list[list[str]]:
        """`[entry_id, sample_id]` of every record handed to training and not acked (for the checkpoint)."""
        return [[eid.decode() if isinstance(eid, bytes) else eid, sid]
                for b in self._taken for eid, sid in zip(b.entry_ids, b.sample_ids)]

    def commit(self, tag: str) -> int:
        """Ack everything handed to training (call after the checkpoint holding it). Returns records acked."""
        n = 0
        for b in self._taken:
            flags = self.buffer.ack(b, tag=tag)
            n += sum(flags)
            self._seen.difference_update(b.sample_ids)
        self._taken = []
        return n

    def commit_saved(self, entries: list[list[str]], tag: str) -> None:
        """Replay the ack of a checkpoint's uncommitted records (idempotent; after a restart)."""
        if not entries:
            return
        batch = Batch(self.consumer)
        for eid, sid in entries:
            batch.entry_ids.append(eid.encode())
            batch.records.append(experience_pb2.Experience(sample_id=sid))
            batch.lags.append(0)
        self.buffer.ack(batch, tag=tag)
        log.info("replayed the ack of the %d records the restored checkpoint includes", len(entries))
