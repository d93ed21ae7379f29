"""The learner's side of a weight sync: control RPCs to every replica + one bucketed broadcast.

`WeightSyncCoordinator.sync` is called after every optimizer step:

1. If the replica set changed or the last sync failed: probe the wanted replicas
   (`GetStatus`, which tells each one's `tensor_parallel_size`), plan the ranks
   (`plan_ranks`: the learner is rank 0, a replica with k tensor-parallel workers
   takes k consecutive ranks), then rebuild the group under a fresh `group_id` on the
   coordinator's long-lived `TCPStore`: `JoinWeightGroup` to each live replica,
   concurrently with creating the sender (rank 0), since creation blocks until all
   ranks are in.
2. `UpdateWeights(policy_version, manifest)` to every member, concurrently with
   the sender's broadcast of the buckets. While it waits, the sender asks `_Watch`
   whether a member is gone (a failed update, or no answer to a `GetStatus` probe
   within a third of `timeout_s`): one broadcast stalls on a single lost peer (gloo
   relays through the ranks), so the update is then abandoned (the other members
   stop waiting: `group.abandon`) and resent at once to a group rebuilt without it.
3. Collect the replies. A replica that failed is reported in `replicas_failed`
   and the group is rebuilt without it at the next sync; nothing waits past
   `timeout_s` (join and update each get that budget; a resend gets a fresh one).

The manifest is planned once from the first call of `named_tensors()` and reused
while names, dtypes and shapes stay the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import grpc
import torch
import torch.distributed as dist

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


@dataclasses.dataclass
class _Push:
    """The outcome of one broadcast to `members`: bytes sent, members that took it, failed, or were found gone."""
    members: list[str] = dataclasses.field(default_factory=list)
    sent: int = 0
    ok: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    gone: list[str] = dataclasses.field(default_factory=list)


class _Watch:
    """Asked by the sender while it waits on a broadcast: is a member gone?

    Each member gets a `GetStatus` probe at most every `_PROBE_EVERY_S`; one that does not
    answer within `probe_timeout_s`, or whose UpdateWeights call has already failed, is
    gone: a cut link or a dead pod would otherwise hold every member of the broadcast
    until the sync's deadline."""

    def __init__(self, stubs: dict[str, rollout_pb2_grpc.RolloutServiceStub], updates: dict, probe_timeout_s: float):
        self.stubs, self.updates, self.probe_timeout_s = stubs, updates, probe_timeout_s
        self.probes: dict[str, grpc.Future] = {}
        self.answered = dict.fromkeys(stubs, time.monotonic())
        self.gone: list[str] = []

    def __call__(self) -> str | None:
        now = time.monotonic()
        for a, stub in self.stubs.items():
            probe, update = self.probes.get(a), self.updates[a]
            if update.done() and not update.cancelled() and update.exception() is not None:
                self._lost(a, f"its update failed: {_why(update.exception())}")
            elif probe is not None and probe.done():
                if probe.exception() is not None:
                    self._lost(a, f"no answer to GetStatus: {_why(probe.exception())}")
                del self.probes[a]
                self.answered[a] = now
            elif probe is None and now - self.answered[a] >= _PROBE_EVERY_S:
                self.probes[a] = stub.GetStatus.future(rollout_pb2.GetRolloutStatusRequest(),
                                                       timeout=self.probe_timeout_s)
        return f"replica(s) {', '.join(self.gone)} gone" if self.gone else None

    def _lost(self, address: str, why: str) -> None:
        if address not in self.gone:
            log.warning("replica %s gone during a weight broadcast (%s)", address, why)
            self.gone.append(address)


_PROBE_EVERY_S = 1.0  # how often _Watch probes each member during a broadcast
_QUICK_PROBE_S = 1.0  # how long a sync waits for a replica outside the group to answer


def _why(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def plan_ranks(ranks: Sequence[tuple[str, int]]) -> tuple[int, dict[str, int]]:
    """The layout of a weight group: `(world_size, {address: first rank})`.

    `ranks` is `[(address, ranks it takes)]` in order (a replica's ranks are its
    `tensor_parallel_size`, one per vLLM worker). The learner is rank 0; each replica
    gets the next consecutive ranks, so world_size = 1 + the sum of the replicas' ranks.
    """
    first: dict[str, int] = {}
    nxt = 1
    for address, k in ranks:
        if k < 1:
            raise ValueError(f"replica {address} takes {k} ranks; at least 1")
        if address in first:
            raise ValueError(f"replica {address} listed twice")
        first[address] = nxt
        nxt += k
    return nxt, first


def _replica_budget(budget: float) -> float:
    """What a replica may spend of an RPC's budget: it must still be able to reply in time."""
    return max(budget - min(1.0, 0.1 * budget), 0.001)


class WeightSyncCoordinator:
    """Pushes the learner's weights to a changing set of rollout replicas.

    `master_addr` must be reachable from the replicas (the learner pod's address);
    `master_port` 0 picks a free port. A replica's control channel is a plain
    `ClientConfig(address)`, which takes TLS and the token from the pod's environment.
    """

    def __init__(self, master_addr: str, master_port: int, backend: str, timeout_s: float, bucket_mb: int, *,
                 probe_timeout_s: float = 5.0, bind_addr: str | None = None,
                 device: torch.device | str | None = None):
        if backend not in g.BACKENDS:
            raise ValueError(f"backend must be one of {g.BACKENDS}, got {backend!r}")
        self.master_addr, self.backend, self.timeout_s = master_addr, backend, float(timeout_s)
        self.bucket_bytes = int(bucket_mb) * 1024 * 1024
        self.probe_timeout_s = min(probe_timeout_s, self.timeout_s)
        self.device = device
        store = g.host_store(bind_addr or master_addr, master_port, self.timeout_s)
        self._store: dist.TCPStore | None = store
        self.master_port = store.port
        self._wanted: list[str] = []
        self._members: list[str] = []
        self._ranks: dict[str, int] = {}  # address -> ranks it takes (its tensor_parallel_size)
        self._sender: WeightSender | None = None
        self._group_id = ""
        self._needs_rebuild = True
        self._manifest: rollout_pb2.WeightManifest | None = None
        self._meta: list | None = None
        self._stubs: dict[str, tuple[grpc.Channel, rollout_pb2_grpc.RolloutServiceStub]] = {}
        self._probes: dict[str, grpc.Future] = {}  # GetStatus in flight, by address
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
            ch = sync_channel(ClientConfig(address=address))
            self._stubs[address] = (ch, rollout_pb2_grpc.RolloutServiceStub(ch))
        return self._stubs[address][1]

    def _drop_stub(self, address: str) -> None:
        self._probes.pop(address, None)
        ch, _ = self._stubs.pop(address, (None, None))
        if ch is not None:
            ch.close()

    # -- group -------------------------------------------------------------
    def _close_sender(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self._sender = None

    def _probe(self, addresses: list[str], members: list[str]) -> tuple[list[str], list[str]]:
        """`GetStatus` to `addresses`: `(alive, dead)`, and each alive one's tensor-parallel size.

        A member gets `probe_timeout_s` to answer (the group must know it is there). Any other
        replica gets `_QUICK_PROBE_S`: one that is gone (a cut link) then costs the sync no more
        than that, and its probe stays in flight for the next sync. A failed probe drops the
        channel, so the next one dials afresh instead of waiting out gRPC's reconnect backoff."""
        now = time.monotonic()
        for a in addresses:
            if a not in self._probes:
                self._probes[a] = self._stub(a).GetStatus.future(rollout_pb2.GetRolloutStatusRequest(),
                                                                 timeout=self.probe_timeout_s)
        alive, dead = [], []
        for a in addresses:
            wait_s = self.probe_timeout_s if a in members else min(_QUICK_PROBE_S, self.probe_timeout_s)
            try:
                self._ranks[a] = max(self._probes[a].result(timeout=max(now + wait_s - time.monotonic(), 0.0))
                                     .tensor_parallel_size, 1)
                alive.append(a)
            except grpc.FutureTimeoutError:
                log.warning("replica %s not answering yet; leaving it out of the group", a)
                dead.append(a)
                continue  # its probe stays in flight
            except grpc.RpcError as e:
                log.warning("replica %s unreachable (%s); leaving it out of the group", a, e.code())
                self._drop_stub(a)
                dead.append(a)
            self._probes.pop(a, None)
        return alive, dead

    def _maybe_rebuild(self, deadline: float) -> list[str]:
        """Rebuild the group when needed; returns the replicas left out (unreachable or failed to join)."""
        wanted, members = self._wanted, self._members
        missing = [a for a in wanted if a not in members]
        extra = [a for a in members if a not in wanted]
        if not (self._needs_rebuild or missing or extra):
            return []
        # every replica a new group would hold must answer now: a member gone since the last sync
        # (a pod deleted without unregistering) would stall the group's creation for all of them
        alive, dead = self._probe(wanted, members)
        if not (self._needs_rebuild or extra or set(alive) & set(missing) or set(dead) & set(members)):
            return dead  # the group is unchanged: only still-dead replicas are missing
        failed = self._rebuild(alive, deadline)
        self._needs_rebuild = bool(failed)
        return dead + failed

    def _rebuild(self, candidates: list[str], deadline: float) -> list[str]:
        """Build a new group with `candidates`; returns those that failed to join."""
        self._close_sender()
        self._members = []
        if not candidates:
            return []
        group_id = uuid.uuid4().hex[:12]
        world, first = plan_ranks([(a, self._ranks.get(a, 1)) for a in candidates])
        budget = max(deadline - time.monotonic(), 0.001)
        futs = {a: self._stub(a).JoinWeightGroup.future(rollout_pb2.JoinWeightGroupRequest(
            init_method=self.init_method, rank=first[a], world_size=world, backend=self.backend,
            timeout_s=_replica_budget(budget), group_id=group_id), timeout=budget) for a in candidates}
        sender_err: BaseException | None = None
        try:
            self._sender = WeightSender(self.init_method, world, self.backend, budget, group_id=group_id,
                                        store=self._store, device=self.device)
        except Exception as e:  # noqa: BLE001 - a replica never joined; the RPC replies say which
            sender_err = e
        failed = []
        for a, f in futs.items():
            try:
                taken = max(f.result(timeout=max(deadline - time.monotonic(), 0.001)).ranks, 1)
                if taken != self._ranks.get(a, 1):
                    raise RuntimeError(f"joined with {taken} ranks, planned {self._ranks.get(a, 1)}")
            except Exception as e:  # noqa: BLE001 - grpc.RpcError, a future timeout, a changed TP size
                f.cancel()
                log.warning("replica %s failed to join weight group %s: %s", a, group_id, _why(e))
                failed.append(a)
        if sender_err is not None or failed:
            self._close_sender()
            return failed or list(candidates)
        self._group_id, self._members = group_id, list(candidates)
        log.info("weight group %s: %d replica(s), world size %d: %s", group_id, len(candidates), world, first)
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
        and left out of the next group. A member found gone during the broadcast (it
        stops answering `GetStatus`, or its update fails) costs the others no more than
        that: the broadcast is abandoned at once and resent to a group without it, with
        a fresh `timeout_s`. Raises `ValueError` when the tensors do not match the plan
        of an earlier call (the plan is then recomputed next time).
        """
        with self._lock:
            t0 = time.monotonic()
            manifest = self._plan(named_tensors)
            failed = self._maybe_rebuild(t0 + self.timeout_s)
            t_group = time.monotonic()
            push = self._push(named_tensors, policy_version, manifest, t0 + self.timeout_s)
            if time.monotonic() - t0 > 1.0:  # where a slow sync spent its time
                log.info("weight sync v%d: group %.2fs, broadcast %.2fs", policy_version, t_group - t0,
                         time.monotonic() - t_group)
            if push.gone:
                survivors = [a for a in push.members if a not in push.gone]
                log.warning("replica(s) %s gone during weight broadcast v%d; resending to %s", push.gone,
                            policy_version, survivors)
                for a in push.gone:
                    self._drop_stub(a)  # a fresh channel when it is back (no reconnect backoff)
                left_out = self._rebuild(survivors, time.monotonic() + self.timeout_s)
                self._needs_rebuild = bool(left_out)
                failed += push.gone + left_out
                push = self._push(named_tensors, policy_version, manifest, time.monotonic() + self.timeout_s)
            return SyncResult(time.monotonic() - t0, push.sent, push.ok,
                              list(dict.fromkeys(failed + push.gone + push.failed)))  # a resend may lose one too

    def _push(self, named_tensors: Callable[[], NamedTensors], policy_version: int,
              manifest: rollout_pb2.WeightManifest, deadline: float) -> _Push:
        """One broadcast of `policy_version` to the current members, watched for members that go away."""
        members = list(self._members)
        if not members:
            return _Push()
        budget = max(deadline - time.monotonic(), 0.001)
        req = rollout_pb2.UpdateWeightsRequest(
            policy_version=policy_version, manifest=manifest, group_id=self._group_id,
            timeout_s=_replica_budget(budget))
        futs = {a: self._stub(a).UpdateWeights.future(req, timeout=budget) for a in members}
        watch = _Watch({a: self._stub(a) for a in members}, futs, min(self.probe_timeout_s, self.timeout_s / 3))
        sent, send_err = 0, None
        assert self._sender is not None  # members exist only with a sender
        try:
            sent = self._sender.broadcast(named_tensors(), manifest, timeout_s=budget, interrupted=watch)
        except ValueError:
            self._manifest = None  # the model changed shape: re-plan next time
            self._abandon(futs)
            raise
        except g.Interrupted as e:  # a member is gone: the others stop waiting, the caller resends
            return self._gone(members, futs, watch, f"weight broadcast v{policy_version} abandoned: {e}")
        except Exception as e:  # noqa: BLE001 - TimeoutError / transport error: a replica stalled
            send_err = e
            log.warning("weight broadcast v%d failed: %s", policy_version, e)
        if send_err is None and self._watch_replies(futs, watch, deadline):
            # the sender's part went out (socket buffers take a small model whole), but a member
            # that relays it to others (gloo's tree) is gone: its subtree waits in vain
            return self._gone(members, futs, watch, f"weight broadcast v{policy_version} abandoned: {watch()}")
        ok, failed = self._replies(futs, policy_version, deadline)
        if send_err is not None or len(ok) != len(members):
            self._needs_rebuild = True
            self._close_sender()
            self._members = ok
        return _Push(members, sent if send_err is None else 0, ok, failed)

    def _gone(self, members: list[str], futs: dict, watch: _Watch, why: str) -> _Push:
        """Abandon the update in flight for the members `watch` found gone; the caller resends."""
        log.warning("%s", why)
        self._abandon(futs)
        return _Push(members=members, failed=[a for a in members if a not in watch.gone], gone=watch.gone)

    @staticmethod
    def _watch_replies(futs: dict, watch: _Watch, deadline: float) -> bool:
        """Wait for every UpdateWeights reply, asking `watch` meanwhile; True when a member is gone."""
        while time.monotonic() < deadline:
            pending = [f for f in futs.values() if not f.done()]
            if not pending:
                return False
            if watch():
                return True
            with contextlib.suppress(grpc.FutureTimeoutError, grpc.RpcError, grpc.FutureCancelledError):
                pending[0].result(timeout=min(g.SLICE_S, max(deadline - time.monotonic(), 0.001)))
        return False

    @staticmethod
    def _replies(futs: dict, policy_version: int, deadline: float) -> tuple[list[str], list[str]]:
        """The members whose UpdateWeights reports `policy_version`, and those that failed."""
        ok, failed = [], []
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
        return ok, failed

    def _abandon(self, futs: dict) -> None:
        """Give the update in flight up: its receivers stop waiting (`group.abandon`), the group closes."""
        for f in futs.values():
            f.cancel()
        if self._store is not None and self._group_id:
            g.abandon(self._store, self._group_id)
        self._needs_rebuild = True
        self._close_sender()
        self._members = []

    def close(self) -> None:
        """Close the group, the control channels and the store."""
        self._close_sender()
        for a in list(self._stubs):
            self._drop_stub(a)
        self._store = None
