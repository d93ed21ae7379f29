"""A stand-alone torch.distributed group for weight broadcasts (gloo on CPU, NCCL on GPU).

The group is built directly from a `TCPStore` and the backend's `ProcessGroup`
class, not through `init_process_group`: the learner already has a default group
(DeepSpeed) and so does each vLLM worker, and neither may be disturbed. Both sides
build it the same way (`open_group`), keyed by a `group_id` prefix in the store so
a rebuilt group never sees a dead one's keys. Collectives are called on the
`ProcessGroup` object itself (`pg.broadcast(t, 0)`): `torch.distributed.broadcast`
refuses a group it did not register.

Rank 0 (the learner) hosts the store; every other rank is a client of it.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlparse

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")


def parse_init_method(init_method: str) -> tuple[str, int]:
    """`tcp://host:port` -> `(host, port)`; raises `ValueError` on anything else."""
    u = urlparse(init_method)
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise ValueError(f"init_method must look like tcp://host:port, got {init_method!r}")
    return u.hostname, u.port


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(float(seconds), 0.001))


def host_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A `TCPStore` server on `host:port` (port 0 = a free one; read `.port`)."""
    return dist.TCPStore(host, port, None, True, timeout=_td(timeout_s), wait_for_workers=False)


def join_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A client of the `TCPStore` at `host:port`."""
    return dist.TCPStore(host, port, None, False, timeout=_td(timeout_s))


def _gloo_device():
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if ifname:
        return dist.ProcessGroupGloo.create_device(interface=ifname.split(",")[0])
    return dist.ProcessGroupGloo.create_default_device()


def open_group(store: dist.Store, group_id: str, rank: int, world_size: int, backend: str,
               timeout_s: float) -> dist.ProcessGroup:
    """Create this rank's member of group `group_id`; blocks until every rank has joined.

    gloo: rendezvous happens here (raises after `timeout_s`). nccl: the communicator is
    created lazily by the first collective, on the current CUDA device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    prefix = dist.PrefixStore(f"instructrl/weights/{group_id}/", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # private in the stubs
        opts._timeout = _td(timeout_s)
        opts._devices = [_gloo_device()]
        return cast(dist.ProcessGroup, dist.ProcessGroupGloo(prefix, rank, world_size, opts))
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None or not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs a CUDA build of torch and a GPU")
    opts = nccl.Options()
    opts._timeout = _td(timeout_s)
    return nccl(prefix, rank, world_size, opts)


def close_group(pg: dist.ProcessGroup | None, what: str = "weight group", timeout_s: float = 0.0) -> None:
    """Let a group go without waiting on peers that may be gone.

    A group's destructor waits for its pending collectives, and it runs with the GIL held: one
    stuck on a peer whose link is cut would freeze the whole process (the replica's next join,
    its RPCs) until the collective's timeout. So the group is handed to a daemon thread that
    drops the last reference only once every other holder has (the caller, an exception's
    frames) and the group's own `timeout_s` has passed, when no collective of it can still wait."""
    if pg is not None:
        box = [pg]
        del pg
        threading.Thread(target=_release, args=(box, what, timeout_s), name=f"close-{what}", daemon=True).start()


def _release(box: list, what: str, timeout_s: float) -> None:
    pg = box.pop()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and (sys.getrefcount(pg) > 2  # ours + getrefcount's argument
                                           or time.monotonic() - t0 < timeout_s + 1.0):
        time.sleep(0.05)
    t1 = time.monotonic()
    del pg  # the destructor runs here, on this thread
    if time.monotonic() - t1 > 1.0:
        log.info("releasing %s took %.1fs", what, time.monotonic() - t1)


def broadcast(pg: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float):
    """Start a broadcast from rank 0 of `tensor` (in place on receivers); returns the Work."""
    return pg.broadcast(tensor, 0, _td(timeout_s))


class GroupUnusable(RuntimeError):
    """The weight group is closed or failed earlier: it must be rebuilt (the replica rejoins)."""


class Interrupted(RuntimeError):
    """A wait given up before its deadline: the learner abandoned the update, or found a member gone."""


SLICE_S = 0.25  # how often an interruptible wait asks whether to give up


def _abandoned_key(group_id: str) -> str:
    return f"instructrl/weights/{group_id}/abandoned"


def abandon(store: dist.Store, group_id: str) -> None:
    """Tell every member of `group_id` that the update in flight will not complete (rank 0 only):
    their receives raise `Interrupted` within `SLICE_S` instead of waiting out their deadline."""
    store.set(_abandoned_key(group_id), "1")


def abandoned(store: dist.Store, group_id: str) -> bool:
    return store.check([_abandoned_key(group_id)])


def wait(work, timeout_s: float, what: str, interrupted: Callable[[], str | None] | None = None) -> None:
    """Wait for a collective; an expiry becomes `TimeoutError`, any other failure `RuntimeError`.

    With `interrupted`, the wait asks it every `SLICE_S` and raises `Interrupted` with its
    reason when it returns one (the collective is then abandoned: close the group)."""
    if interrupted is None:
        return _wait_once(work, timeout_s, what)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= SLICE_S or work.is_completed():
            return _wait_once(work, max(left, 0.001), what)
        with contextlib.suppress(TimeoutError):
            return _wait_once(work, SLICE_S, what)
        why = None if work.is_completed() else interrupted()  # completed: the loop returns its outcome
        if why:
            raise Interrupted(f"{what}: {why}")


def _wait_once(work, timeout_s: float, what: str) -> None:
    """torch raises the same types (DistBackendError, RuntimeError) for a timeout and for a peer
    that went away, so the clock tells them apart, not the message: a failure at (90 % of)
    the deadline or later is the timeout."""
    t0 = time.monotonic()
    try:
        ok = work.wait(_td(timeout_s))
    except Exception as e:  # noqa: BLE001 - torch raises DistBackendError/RuntimeError variants
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, TimeoutError) or time.monotonic() - t0 >= 0.9 * timeout_s:
            raise TimeoutError(f"{what}: timed out after {timeout_s:.1f}s ({first})") from e
        raise RuntimeError(f"{what}: {first}") from e
    if ok is False:
        raise TimeoutError(f"{what}: timed out after {timeout_s:.1f}s")
