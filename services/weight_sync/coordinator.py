"""The learner's side of a weight sync: control RPCs to every replica + one bucketed broadcast.

`WeightSyncCoordinator.sync` is called after every optimizer step:

1. If the replica set changed or the last sync failed: probe the wanted replicas
   (`GetStatus`), then rebuild the group under a fresh `group_id` on the
   coordinator's long-lived `TCPStore`: `JoinWeightGroup` to each live replica,
   concurrently with creating the sender (rank 0), since creation blocks until all
   ranks are in.
2. `UpdateWeights(policy_version, manifest)` to every member, concurrently with
   the sender's broadcast of the buckets.
3. Collect the replies. A replica that failed is reported in `replicas_failed`
   and the group is rebuilt without it at the next sync; nothing waits past
   `timeout_s` (join and update each get that budget).

The manifest is planned once from the first call of `named_tensors()` and reused
while names, dtypes and shapes stay the same.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from typing import Callable, Iterable

import grpc
import torch

from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import rollout_pb2, rollout_pb2_grpc
from instructrl.weight_sync import group as g
from instructrl.weight_sync.manifest import param_meta, plan_buckets
from instructrl.weight_sync.transport import WeightSender

log = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclasses.dataclass
class SyncResult:
    seconds: float
    bytes: int
    replicas_ok: list[str]
    replicas_failed: list[str]


def _why(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _replica_budget(budget: float) -> float:
    """What a replica may spend of an RPC's budget: it must still be able to reply in time."""
    return max(budget - min(1.0, 0.1 * budget), 0.001)


class WeightSyncCoordinator:
    """Pushes the learner's weights to a changing set of rollout replicas.

    `master_addr` must be reachable from the replicas (the learner pod's address);
    `master_port` 0 picks a free port. `client_cfg_factory(address)` builds the
    `ClientConfig` (TLS, token) of a replica's control channel.
    """

    def __init__(self, master_addr: str, master_port: int, backend: str, timeout_s: float, bucket_mb: int,
                 client_cfg_factory: Callable[[str], ClientConfig] | None = None, *,
                 abort_in_flight: bool = False, probe_timeout_s: float = 5.0, bind_addr: str | None = None,
                 device: torch.device | str | None = None):
        if backend not in g.BACKENDS:
            raise ValueError(f"backend must be one of {g.BACKENDS}, got {backend!r}")
        self.master_addr, self.backend, self.timeout_s = master_addr, backend, float(timeout_s)
        self.bucket_bytes = int(bucket_mb) * 1024 * 1024
        self.abort_in_flight = abort_in_flight
        self.probe_timeout_s = min(probe_timeout_s, self.timeout_s)
        self.device = device
        self._cfg = client_cfg_factory or (lambda a: ClientConfig(address=a))
        self._store = g.host_store(bind_addr or master_addr, master_port, self.timeout_s)
        self.master_port = self._store.port
        self._wanted: list[str] = []
        self._members: list[str] = []
        self._sender: WeightSender | None = None
        self._group_id = ""
        self._needs_rebuild = True
        self._manifest: rollout_pb2.WeightManifest | None = None
        self._meta: list | None = None
        self._stubs: dict[str, tuple[grpc.Channel, rollout_pb2_grpc.RolloutServiceStub]] = {}
        self._lock = threading.Lock()

    # -- replica set -------------------------------------------------------
    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"

    @property
    def replicas(self) -> list[str]:
        """Replicas in the current broadcast group."""
        return list(self._members)

    def set_replicas(self, addresses: list[str]) -> None:
        """The replicas the next sync should reach (host:port of their RolloutService)."""
        self._wanted = list(dict.fromkeys(addresses))

    def _stub(self, address: str) -> rollout_pb2_grpc.RolloutServiceStub:
        if address not in self._stubs:
            ch = sync_channel(self._cfg(address))
            self._stubs[address] = (ch, rollout_pb2_grpc.RolloutServiceStub(ch))
        return self._stubs[address][1]

    def _drop_stub(self, address: str) -> None:
        ch, _ = self._stubs.pop(address, (None, None))
        if ch is not None:
            ch.close()

    # -- group -------------------------------------------------------------
    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self._sender = None

    def _probe(self, addresses: list[str]) -> tuple[list[str], list[str]]:
        futs = {a: self._stub(a).GetStatus.future(rollout_pb2.GetRolloutStatusRequest(),
                                                  timeout=self.probe_timeout_s) for a in addresses}
        alive, dead = [], []
        for a, f in futs.items():
            try:
                f.result()
                alive.append(a)
            except grpc.RpcError as e:
                log.warning("replica %s unreachable (%s); leaving it out of the group", a, e.code())
                dead.append(a)
        return alive, dead

    def _maybe_rebuild(self, deadline: float) -> list[str]:
        """Rebuild the group when needed; returns the replicas left out (unreachable or failed to join)."""
        wanted, members = self._wanted, self._members
        missing = [a for a in wanted if a not in members]
        extra = [a for a in members if a not in wanted]
        if not (self._needs_rebuild or missing or extra):
            return []
        alive, dead = self._probe(wanted if self._needs_rebuild else missing)
        if not self._needs_rebuild and not extra and len(alive) == 0:
            return dead  # the group is unchanged: only still-dead replicas are missing
        keep = [] if self._needs_rebuild else [a for a in members if a in wanted]
        failed = self._rebuild(keep + alive, deadline)
        self._needs_rebuild = bool(failed)
        return dead + failed

    def _rebuild(self, candidates: list[str], deadline: float) -> list[str]:
        """Build a new group with `candidates`; returns those that failed to join."""
        self._close_sender()
        self._members = []
        if not candidates:
            return []
        group_id = uuid.uuid4().hex[:12]
        world = len(candidates) + 1
        budget = max(deadline - time.monotonic(), 0.001)
        futs = {a: self._stub(a).JoinWeightGroup.future(rollout_pb2.JoinWeightGroupRequest(
            init_method=self.init_method, rank=r + 1, world_size=world, backend=self.backend,
            timeout_s=_replica_budget(budget), group_id=group_id), timeout=budget) for r, a in enumerate(candidates)}
        sender_err: BaseException | None = None
        try:
            self._sender = WeightSender(self.init_method, world, self.backend, budget, group_id=group_id,
                                        store=self._store, device=self.device)
        except Exception as e:  # noqa: BLE001 - a replica never joined; the RPC replies say which
            sender_err = e
        failed = []
        for a, f in futs.items():
            try:
                f.result(timeout=max(deadline - time.monotonic(), 0.001))
            except Exception as e:  # noqa: BLE001 - grpc.RpcError or a future timeout
                f.cancel()
                log.warning("replica %s failed to join weight group %s: %s", a, group_id, _why(e))
                failed.append(a)
        if sender_err is not None or failed:
            self._close_sender()
            return failed or list(candidates)
        self._group_id, self._members = group_id, list(candidates)
        log.info("weight group %s: %d replica(s) %s", group_id, len(candidates), candidates)
        return []

    # -- sync --------------------------------------------------------------
    def _plan(self, named_tensors: Callable[[], NamedTensors]) -> rollout_pb2.WeightManifest:
        if self._manifest is None:
            self._meta = param_meta(named_tensors())
            self._manifest = plan_buckets(self._meta, self.bucket_bytes)
        return self._manifest

    def sync(self, named_tensors: Callable[[], NamedTensors], policy_version: int) -> SyncResult:
        """Push the weights `named_tensors()` yields to every replica as `policy_version`.

        Never raises for a replica's failure: it is reported in `replicas_failed`
        and left out of the next group. Raises `ValueError` when the tensors do not
        match the plan of an earlier call (the plan is then recomputed next time).
        """
        with self._lock:
            t0 = time.monotonic()
            deadline = t0 + self.timeout_s
            manifest = self._plan(named_tensors)
            failed = self._maybe_rebuild(deadline)
            members = list(self._members)
            if not members:
                return SyncResult(time.monotonic() - t0, 0, [], failed)
            budget = max(deadline - time.monotonic(), 0.001)
            req = rollout_pb2.UpdateWeightsRequest(
                policy_version=policy_version, manifest=manifest, group_id=self._group_id,
                timeout_s=_replica_budget(budget), abort_in_flight=self.abort_in_flight)
            futs = {a: self._stub(a).UpdateWeights.future(req, timeout=budget) for a in members}
            sent, send_err = 0, None
            try:
                sent = self._sender.broadcast(named_tensors(), manifest, timeout_s=budget)
            except ValueError:
                self._manifest = None  # the model changed shape: re-plan next time
                self._abandon(futs)
                raise
            except Exception as e:  # noqa: BLE001 - TimeoutError / transport error: a replica stalled
                send_err = e
                log.warning("weight broadcast v%d failed: %s", policy_version, e)
            ok = []
            for a, f in futs.items():
                try:
                    resp = f.result(timeout=max(deadline - time.monotonic(), 0.001))
                    if resp.policy_version != policy_version:
                        raise RuntimeError(f"replica reports version {resp.policy_version}")
                    ok.append(a)
                except Exception as e:  # noqa: BLE001 - grpc.RpcError, future timeout, wrong version
                    f.cancel()
                    log.warning("replica %s failed update v%d: %s", a, policy_version, _why(e))
                    failed.append(a)
            if send_err is not None or len(ok) != len(members):
                self._needs_rebuild = True
                self._close_sender()
                self._members = [a for a in members if a in ok]
            return SyncResult(time.monotonic() - t0, sent if send_err is None else 0, ok,
                              list(dict.fromkeys(failed)))

    def _abandon(self, futs: dict) -> None:
        for f in futs.values():
            f.cancel()
        self._needs_rebuild = True
        self._close_sender()

    def close(self) -> None:
        """Close the group, the control channels and the store."""
        self._close_sender()
        for a in list(self._stubs):
            self._drop_stub(a)
        self._store = None
