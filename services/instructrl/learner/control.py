"""State shared by the training loop (main thread) and the LearnerService (gRPC thread).

Transport-free: the servicer in `server.py` is a thin shell over `Control`. The loop
publishes its status here after every iteration and reads the registered replicas and
pending checkpoint requests; the RPC side registers replicas and queues requests.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

from instructrl.learner import access


@dataclasses.dataclass
class Status:
    policy_version: int = 0  # iterations trained (one batch each) by this run's lineage
    optimizer_step: int = 0  # optimizer steps of that lineage (one per minibatch)
    kl_coef: float = 0.0
    last_checkpoint: str = ""
    samples_trained: int = 0
    max_iterations: int = 0  # 0 = no limit
    finished: bool = False
    max_policy_lag: int = -1  # -1 = no limit
    policy_lag_mean: float = 0.0  # of the last batch
    stale_dropped: int = 0
    buffer_depth: int = 0  # experience records written and not yet acked
    outstanding: int = 0  # samples admitted or written, not yet trained (pacing's O)


@dataclasses.dataclass
class Replica:
    """A registered rollout replica as the learner knows it."""

    address: str  # host:port of its RolloutService
    policy_version: int = -1  # its weights' version: from its registration or a sync it acknowledged (-1: unknown)
    failed_syncs: int = 0  # consecutive


class Control:
    """Replica registry, status snapshot, checkpoint and catch-up requests, the stop flag; thread-safe."""

    def __init__(self, checkpoint_dir: str = "checkpoints", register_allow: list[str] | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir  # SaveCheckpoint writes under it only
        self.register_allow = list(register_allow or [])  # RegisterRollout addresses (learner/access.py)
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}  # by replica_id
        self._status = Status()
        self._saves: list[tuple[str, concurrent.futures.Future]] = []
        self._catch_up = False
        self.stop = threading.Event()
        self.ready = threading.Event()  # set by the loop once models are loaded and resumed

    # -- rollout replicas ----------------------------------------------------
    def register(self, replica_id: str, address: str, policy_version: int = -1, peer: str = "") -> int:
        """Add, move or refresh a replica; returns the learner's version. `address` must be
        host:port and allowed by `register_allow` for a caller at `peer` (the gRPC peer string).

        A replica that is new, moved, or reports weights at another version than the
        learner's asks for a catch-up sync: the loop broadcasts its current weights at the
        next chance, without waiting for an iteration (`take_catch_up`).
        """
        if not replica_id or not address:
            raise ValueError("replica_id and address are required")
        host, _ = access.parse_address(address)
        access.check_allowed(host, peer, self.register_allow)
        with self._lock:
            known = self._replicas.get(replica_id)
            if known is None or known.address != address:  # a new address starts with a clean record
                known = self._replicas[replica_id] = Replica(address)
            if policy_version >= 0:
                known.policy_version = policy_version
            if known.policy_version != self._status.policy_version:
                self._catch_up = True
            return self._status.policy_version

    def unregister(self, replica_id: str) -> None:
        with self._lock:
            self._replicas.pop(replica_id, None)

    def take_catch_up(self) -> bool:
        """True once after a registration asked for the current weights (then cleared)."""
        with self._lock:
            due, self._catch_up = self._catch_up, False
            return due

    def catch_up_requested(self) -> bool:
        with self._lock:
            return self._catch_up

    def record_sync(self, ok: list[str], failed: list[str], evict_after: int, policy_version: int) -> list[str]:
        """After a sync of `policy_version`: replicas in `ok` (by address) are at that version;
        those in `failed` count a consecutive failure and are forgotten after `evict_after`
        (0 = never). Returns the evicted replica ids. A worker whose replica is alive
        re-registers within its `register_interval_s` (and is then caught up), so eviction
        only stops probing a replica that is gone.
        """
        ok_set, failed_set = set(ok), set(failed)
        evicted = []
        with self._lock:
            for rid, r in list(self._replicas.items()):
                if r.address in ok_set:
                    r.failed_syncs, r.policy_version = 0, policy_version
                elif r.address in failed_set:
                    r.failed_syncs += 1
                    if evict_after > 0 and r.failed_syncs >= evict_after:
                        del self._replicas[rid]
                        evicted.append(rid)
        return evicted

    def replicas(self) -> dict[str, str]:
        """replica_id -> address of every registered replica."""
        with self._lock:
            return {rid: r.address for rid, r in self._replicas.items()}

    def replica_states(self) -> dict[str, Replica]:
        with self._lock:
            return {rid: dataclasses.replace(r) for rid, r in self._replicas.items()}

    # -- status --------------------------------------------------------------
    def publish(self, **fields) -> None:
        with self._lock:
            self._status = dataclasses.replace(self._status, **fields)

    def status(self) -> Status:
        with self._lock:
            return dataclasses.replace(self._status)

    # -- checkpoint requests --------------------------------------------------
    def request_save(self, name: str = "") -> concurrent.futures.Future:
        """Ask the loop for a checkpoint at its next iteration boundary, the regular one ("") or a
        copy in `checkpoint_dir/name` (InvalidArgument for anything but a plain name there); the
        future gets (path, optimizer_step)."""
        path = access.checkpoint_path(self.checkpoint_dir, name)
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
