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

import datetime
import logging
import os
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
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _td(timeout_s)
        opts._devices = [_gloo_device()]
        return dist.ProcessGroupGloo(prefix, rank, world_size, opts)
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None or not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs a CUDA build of torch and a GPU")
    opts = nccl.Options()
    opts._timeout = _td(timeout_s)
    return nccl(prefix, rank, world_size, opts)


def close_group(pg: dist.ProcessGroup | None) -> None:
    """Tear a group down without waiting on peers that may be gone."""
    if pg is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(pg, method, None)
        if fn is None:
            continue
        try:
            fn()
            return
        except Exception:  # noqa: BLE001 - best effort: the group is being discarded
            log.debug("process group %s() failed", method, exc_info=True)


def broadcast(pg: dist.ProcessGroup, tensor: torch.Tensor, timeout_s: float):
    """Start a broadcast from rank 0 of `tensor` (in place on receivers); returns the Work."""
    return pg.broadcast(tensor, 0, _td(timeout_s))


def wait(work, timeout_s: float, what: str) -> None:
    """Wait for a collective; any failure or expiry becomes `TimeoutError` / `RuntimeError`."""
    try:
        ok = work.wait(_td(timeout_s))
    except Exception as e:  # noqa: BLE001 - torch raises DistBackendError/RuntimeError variants
        msg = str(e)
        if "imeout" in msg or "imed out" in msg:
            raise TimeoutError(f"{what}: timed out after {timeout_s:.1f}s ({msg.splitlines()[0]})") from e
        raise RuntimeError(f"{what}: {msg.splitlines()[0] if msg else type(e).__name__}") from e
    if ok is False:
        raise TimeoutError(f"{what}: timed out after {timeout_s:.1f}s")
