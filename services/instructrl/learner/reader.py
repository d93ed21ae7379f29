"""Rank 0's side of the experience buffer: fill a batch, hold it, commit it after a checkpoint.

Exactly-once (docs/learner.md): records are acked (`ExperienceBuffer.ack`, which marks
their sample_ids used in Redis, atomically with XACK) only after a checkpoint that
includes their update is on disk. Until then they stay pending at this consumer; their
leases are renewed (`touch`) so that nobody reclaims them, and the buffer, which knows
what this consumer holds, hands over no copy of them (de-duplication is the buffer's
alone). Staleness is decided here, by `pacing.*`. The checkpoint lists them
(`uncommitted()`), and a restarted learner acks that list first (`commit_saved`), so a
kill between "checkpoint written" and "acked" cannot train them again. A kill before
the checkpoint leaves them pending: they are reclaimed (XAUTOCLAIM) after
`buffer.claim_idle_ms` and trained once by the restored, older model.

Pacing (buffer/pacing.py): the reader publishes the learner's side of the admission rule,
its version and the records it holds trained but unacked, after every iteration; `held`
falls in the same transaction as the ack. Prompts whose records arrive too stale are
queued again. Rank 0 alone exports the run-wide buffer gauges.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from instructrl.buffer import Batch, ExperienceBuffer, PacingConfig, PromptQueue
from instructrl.buffer import metrics as buffer_metrics
from instructrl.buffer.pacing import Pacing
from instructrl.v1 import experience_pb2

log = logging.getLogger(__name__)


class ExperienceReader:
    """Fills batches of `batch_size` fresh records from the buffer (rank 0 only)."""

    def __init__(self, buffer: ExperienceBuffer, consumer: str, batch_size: int, pacing: PacingConfig,
                 temperature: float = 0.0):
        self.buffer, self.consumer, self.batch_size, self.pacing = buffer, consumer, batch_size, pacing
        self.temperature = temperature  # > 0: refuse records sampled at another (ppo.temperature)
        self.prompts = PromptQueue(buffer.cfg, client=buffer.r)  # to queue stale prompts again
        self.admission = Pacing(buffer.r, buffer.cfg.run_id)
        buffer_metrics.REQUEUED.labels("prompts")  # a series from the start
        self._pool: list[experience_pb2.Experience] = []  # fresh records of the batch being filled
        self._pool_lags: list[int] = []
        self._filling: list[Batch] = []  # buffer batches the pool came from
        self._taken: list[Batch] = []  # buffer batches handed to training, not yet acked
        self.stale_dropped = 0
        self.duplicates = 0
        self.wrong_temperature = 0

    def fill(self, learner_version: int, interrupted: Callable[[], bool]) -> tuple[list, list[int]] | None:
        """Block until `batch_size` fresh records are read; None if `interrupted()` first.

        Returns the records and their policy lags. Stale records are dropped (or kept with
        their lag) by the buffer per `pacing.max_policy_lag` / `pacing.stale_policy`; the
        buffer hands over no sample_id that is committed or that this consumer holds.
        """
        while len(self._pool) < self.batch_size:
            if interrupted():
                return None
            self.touch()
            got = self.buffer.get(self.batch_size - len(self._pool), self.consumer,
                                  learner_version=learner_version, max_policy_lag=self.pacing.max_policy_lag,
                                  stale_policy=self.pacing.stale_policy, temperature=self.temperature)
            self.stale_dropped += got.stale_dropped
            if got.wrong_temperature:
                self.wrong_temperature += got.wrong_temperature
                log.warning("refused %d records sampled at another temperature than ppo.temperature=%g "
                            "(dead-lettered, reason temperature; %d so far): set the rollout workers' "
                            "sampling.temperature, or ppo.temperature=0 to train at the records' own",
                            got.wrong_temperature, self.temperature, self.wrong_temperature)
            self.duplicates += got.duplicates
            if got.stale:
                self.prompts.requeue(got.stale)
            self.refresh_gauges(force=False)
            if got.entry_ids:
                self._filling.append(got)
            self._pool += got.records
            self._pool_lags += got.lags
        records, lags = self._pool, self._pool_lags
        self._pool, self._pool_lags = [], []
        self._taken += self._filling
        self._filling = []
        return records, lags

    def publish(self, learner_version: int, finished: bool = False) -> None:
        """The learner's side of the admission rule: version, max_policy_lag, batch size, and the
        records held trained but unacked (they are no longer outstanding)."""
        self.admission.publish(learner_version, self.pacing.max_policy_lag, self.batch_size, self.held(),
                               finished)

    def held(self) -> int:
        """Records handed to training and not yet acked."""
        return sum(len(b.entry_ids) for b in self._taken)

    def refresh_gauges(self, force: bool = True) -> None:
        """The run-wide depth / pending / lag gauges of both streams (this process alone exports them)."""
        self.buffer.refresh_gauges(force)
        self.prompts.refresh_gauges(force)

    def touch(self) -> None:
        """Renew this consumer's lease on every batch it holds."""
        for b in self._taken + self._filling:
            self.buffer.touch(b)

    def uncommitted(self) -> list[list[str]]:
        """`[entry_id, sample_id]` of every record handed to training and not acked (for the checkpoint)."""
        return [[eid.decode() if isinstance(eid, bytes) else eid, sid]
                for b in self._taken for eid, sid in zip(b.entry_ids, b.sample_ids, strict=True)]

    def commit(self, tag: str) -> int:
        """Ack everything handed to training (call after the checkpoint holding it). Returns records acked."""
        n = 0
        for b in self._taken:  # each ack and its `held -= len` in one transaction
            n += sum(self.buffer.ack(b, tag=tag, extra=lambda pipe, b=b:
                                     self.admission.released_in(pipe, len(b.entry_ids))))
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
