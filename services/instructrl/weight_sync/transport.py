"""Bucketed weight broadcast: `WeightSender` on the learner (rank 0), `WeightReceiver` per replica.

One update = one pass over the manifest's buckets. The sender packs bucket k+1
while bucket k is on the wire (two staging buffers); the receiver posts the
receive of bucket k+1 before handing bucket k to the loader, so loading overlaps
the transfer. Every wait is bounded by the update's deadline; on expiry the call
raises `TimeoutError` and the group is marked broken (gloo and NCCL leave a group
in an undefined state after a failed collective): close it and build a new one.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from instructrl.codec import datatype_name
from instructrl.v1 import rollout_pb2
from instructrl.weight_sync import group as g
from instructrl.weight_sync.manifest import pack_into, params_by_bucket, unpack


def _default_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Member:
    """What sender and receiver share: the group, its deadline handling, its broken flag."""

    def __init__(self, init_method: str, rank: int, world_size: int, backend: str, timeout_s: float,
                 group_id: str, store, device: torch.device | str | None):
        host, port = g.parse_init_method(init_method)
        self.init_method, self.rank, self.world_size = init_method, rank, world_size
        self.backend, self.timeout_s, self.group_id = backend, float(timeout_s), group_id
        self.device = torch.device(device) if device is not None else _default_device(backend)
        self._own_store = store is None
        if store is None:
            store = (g.host_store(host, port, timeout_s) if rank == 0
                     else g.join_store(host, port, timeout_s))
        self.store = store
        self.pg: dist.ProcessGroup | None = g.open_group(store, group_id, rank, world_size, backend, timeout_s)
        self.broken = False

    def _check(self) -> dist.ProcessGroup:
        """The open, healthy group; raises when it is closed or failed earlier."""
        if self.pg is None:
            raise g.GroupUnusable(f"weight group {self.group_id} is closed")
        if self.broken:
            raise g.GroupUnusable(f"weight group {self.group_id} failed earlier; rebuild it")
        return self.pg

    def _wait(self, work, deadline: float, what: str, interrupted: Callable[[], str | None] | None = None) -> None:
        try:
            g.wait(work, max(deadline - time.monotonic(), 0.001), what, interrupted)
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        self._drop_buffers()
        g.close_group(self.pg, f"weight group {self.group_id}", self.timeout_s)
        self.pg = None
        if self._own_store:
            self.store = None

    def _drop_buffers(self) -> None:
        """Free the buffers kept between updates (each side keeps its own)."""


class WeightSender(_Member):
    """Rank 0 of a weight group: broadcasts named tensors bucket by bucket.

    `store`/`group_id` let a caller that keeps one long-lived `TCPStore` (the
    coordinator) build successive groups on it; by default rank 0 hosts a store on
    the `init_method` port itself.
    """

    def __init__(self, init_method: str, world_size: int, backend: str = "gloo", timeout_s: float = 60.0,
                 *, group_id: str = "default", store=None, device: torch.device | str | None = None):
        super().__init__(init_method, 0, world_size, backend, timeout_s, group_id, store, device)
        self._staging: list[torch.Tensor] = []

    def _staging_buffers(self, nbytes: int, count: int) -> list[torch.Tensor]:
        """Two packing buffers kept between updates (fresh memory costs page faults every time)."""
        if len(self._staging) < count or any(b.numel() < nbytes for b in self._staging[:count]):
            self._staging = [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count)]
        return self._staging[:count]

    def _drop_buffers(self) -> None:
        self._staging = []

    def _alone(self, specs, tensors, nbytes: int) -> torch.Tensor | None:
        """A bucket that is exactly one contiguous tensor on our device is sent as is (no copy)."""
        if len(specs) != 1:
            return None
        t, p = tensors[0].detach(), specs[0]
        if (t.device != self.device or not t.is_contiguous() or p.nbytes != nbytes
                or datatype_name(t.dtype) != p.datatype or tuple(t.shape) != tuple(p.shape)):
            return None
        return t.reshape(-1).view(torch.uint8)

    def broadcast(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  manifest: rollout_pb2.WeightManifest, timeout_s: float | None = None,
                  interrupted: Callable[[], str | None] | None = None) -> int:
        """Send every tensor of `manifest`; `named_tensors` must yield them in manifest order.

        Returns the bytes sent. Raises `TimeoutError` when a bucket is not through
        within the deadline (`timeout_s`, default the group's), `ValueError` when a
        tensor does not match the manifest, `RuntimeError` on a transport failure, and
        `group.Interrupted` as soon as `interrupted()` (asked while waiting) gives a reason.
        """
        pg = self._check()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        groups = params_by_bucket(manifest)
        it = iter(named_tensors)
        staging = self._staging_buffers(max((b.nbytes for b in manifest.buckets), default=0), min(2, len(groups)))
        pending: list = [None] * len(staging)
        sent = 0
        try:
            for k, specs in enumerate(groups):
                slot = k % len(staging)
                if pending[slot] is not None:  # the buffer is reused: its last send must be done
                    self._wait(pending[slot], deadline, f"bucket {k - len(staging)}", interrupted)
                    pending[slot] = None
                nbytes = manifest.buckets[k].nbytes
                tensors = []
                for p in specs:
                    name, t = next(it)
                    if name != p.name:
                        raise ValueError(f"expected {p.name!r} next (manifest order), got {name!r}")
                    tensors.append(t)
                buf = self._alone(specs, tensors, nbytes)
                if buf is None:
                    buf = staging[slot][:nbytes]
                    pack_into(buf, specs, tensors)
                if buf.is_cuda:
                    torch.cuda.current_stream(buf.device).synchronize()
                pending[slot] = g.broadcast(pg, buf, max(deadline - time.monotonic(), 0.001))
                sent += nbytes
            for work in pending:
                if work is not None:
                    self._wait(work, deadline, "last bucket", interrupted)
        except (ValueError, StopIteration) as e:
            self.broken = True  # receivers are left waiting for buckets that will not come
            raise ValueError(f"named_tensors does not match the manifest: {e or 'ran out of tensors'}") from e
        except BaseException:
            self.broken = True
            raise
        return sent


class WeightReceiver(_Member):
    """Rank `rank` > 0 of a weight group: receives an update bucket by bucket."""

    def __init__(self, init_method: str, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 60.0, *, group_id: str = "default", store=None,
                 device: torch.device | str | None = None):
        if rank <= 0:
            raise ValueError(f"a receiver's rank must be > 0 (the sender is rank 0), got {rank}")
        super().__init__(init_method, rank, world_size, backend, timeout_s, group_id, store, device)
        self.bytes_received = 0
        self._buffers: dict[int, torch.Tensor] = {}

    def _bucket(self, k: int, nbytes: int, reuse: bool) -> torch.Tensor:
        if not reuse:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        buf = self._buffers.get(k)
        if buf is None or buf.numel() != nbytes:
            buf = self._buffers[k] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    def _drop_buffers(self) -> None:
        self._buffers = {}

    def _abandoned(self) -> str | None:
        """Whether the learner gave this update up (`group.abandon`): then stop waiting now."""
        try:
            return "the learner abandoned this update" if g.abandoned(self.store, self.group_id) else None
        except Exception:  # noqa: BLE001 - the store unreachable: the deadline still bounds the wait
            return None

    def receive(self, manifest: rollout_pb2.WeightManifest, timeout_s: float | None = None,
                reuse_buffers: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` for every parameter of `manifest`, one bucket at a time.

        Tensors are views into the received buckets (no copy). With `reuse_buffers`
        the buckets are kept and refilled by the next `receive`, so the tensors are
        valid until then (saves allocating and faulting in a model's worth of memory
        per update, at the price of keeping it); otherwise every update gets fresh
        buckets and the tensors may be kept. The receive of the next bucket is in
        flight while the caller consumes the current one. Raises `TimeoutError` past
        the deadline, `group.Interrupted` soon after the learner abandons the update;
        `bytes_received` counts the bytes of the buckets completed.
        `manifest` must be valid (`manifest.validate`; the rollout engine checks it when
        the UpdateWeights request arrives).
        """
        pg = self._check()
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        groups = params_by_bucket(manifest)
        self.bytes_received = 0

        def post(k: int) -> tuple[torch.Tensor, dist.Work]:
            buf = self._bucket(k, manifest.buckets[k].nbytes, reuse_buffers)
            return buf, g.broadcast(pg, buf, max(deadline - time.monotonic(), 0.001))

        done = False
        try:
            nxt = post(0) if groups else None
            for k, specs in enumerate(groups):
                assert nxt is not None  # posted ahead for every bucket
                buf, work = nxt
                self._wait(work, deadline, f"bucket {k}/{len(groups)}", self._abandoned)
                self.bytes_received += buf.numel()
                nxt = post(k + 1) if k + 1 < len(groups) else None
                yield from unpack(buf, specs)
            done = True
        finally:
            if not done:  # abandoned or failed mid-update: a receive may still be posted
                self.broken = True
