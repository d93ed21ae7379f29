"""State shared by the training loop (main thread) and the LearnerService (gRPC thread).

Transport-free: the servicer in `server.py` is a thin shell over `Control`. The loop
publishes its status here after every iteration and reads the registered replicas and
pending checkpoint requests; the RPC side registers replicas and queues requests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading


@dataclasses.dataclass
class Status:
    policy_version: int = 0
    step: int = 0  # iterations (= policy_version updates made by this run's lineage)
    kl_coef: float = 0.0
    last_checkpoint: str = ""
    samples_trained: int = 0


class Control:
    """Replica registry, status snapshot, checkpoint requests and the stop flag; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, str] = {}  # replica_id -> host:port of its RolloutService
        self._failures: dict[str, int] = {}  # replica_id -> consecutive failed syncs
        self._status = Status()
        self._saves: list[tuple[str, concurrent.futures.Future]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()  # set by the loop once models are loaded and resumed

    # -- rollout replicas ----------------------------------------------------
    def register(self, replica_id: str, address: str) -> int:
        """Add (or move) a replica; it joins the broadcast group at the next sync. Returns the version."""
        if not replica_id or not address:
            raise ValueError("replica_id and address are required")
        with self._lock:
            if self._replicas.get(replica_id) != address:
                self._failures.pop(replica_id, None)  # a new address starts with a clean record
            self._replicas[replica_id] = address
            return self._status.policy_version

    def unregister(self, replica_id: str) -> None:
        with self._lock:
            self._replicas.pop(replica_id, None)
            self._failures.pop(replica_id, None)

    def record_sync(self, ok: list[str], failed: list[str], evict_after: int) -> list[str]:
        """Count consecutive failed syncs per replica (by address); forget a replica after `evict_after`.

        Returns the evicted replica ids. A worker whose replica is alive re-registers within
        its `register_interval_s`, so eviction only stops probing a replica that is gone.
        `evict_after` 0 never evicts.
        """
        ok_set, failed_set = set(ok), set(failed)
        evicted = []
        with self._lock:
            for rid, address in list(self._replicas.items()):
                if address in ok_set:
                    self._failures.pop(rid, None)
                elif address in failed_set:
                    self._failures[rid] = n = self._failures.get(rid, 0) + 1
                    if evict_after > 0 and n >= evict_after:
                        del self._replicas[rid]
                        del self._failures[rid]
                        evicted.append(rid)
        return evicted

    def replicas(self) -> dict[str, str]:
        with self._lock:
            return dict(self._replicas)

    # -- status --------------------------------------------------------------
    def publish(self, **fields) -> None:
        with self._lock:
            self._status = dataclasses.replace(self._status, **fields)

    def status(self) -> Status:
        with self._lock:
            return dataclasses.replace(self._status)

    # -- checkpoint requests --------------------------------------------------
    def request_save(self, path: str = "") -> concurrent.futures.Future:
        """Ask the loop for a checkpoint at its next iteration boundary; the future gets (path, step)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._saves.append((path, fut))
        return fut

    def save_requested(self) -> bool:
        with self._lock:
            return bool(self._saves)

    def take_save_request(self) -> tuple[str, concurrent.futures.Future] | None:
        with self._lock:
            return self._saves.pop(0) if self._saves else None

    def fail_pending(self, exc: BaseException) -> None:
        """Fail every queued checkpoint request (the loop is exiting)."""
        with self._lock:
            saves, self._saves = self._saves, []
        for _, fut in saves:
            if not fut.done():
                fut.set_exception(exc)
