"""The vLLM worker extension that joins the weight group and reloads weights in place.

vLLM mixes this class into its worker (`worker_extension_cls`), so its methods run
in the worker process, where the model lives: in the engine-core process with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (one worker, in-process executor), or in the
executor's worker process otherwise. The engine calls them through
`AsyncLLM.collective_rpc`, which serializes only plain values (msgpack): the
manifest travels as serialized protobuf bytes, tensors over the torch.distributed
group.

Loading goes through `model_runner.reload_weights(weights_iterator=...)`: on
vLLM-CPU `model.load_weights` alone fails once weights have been processed into
kernel layout, while `reload_weights` restores the checkpoint layout, loads, and
re-runs the processing. Method names avoid vLLM's own (`update_weights`, ...):
vLLM refuses an extension that shadows a worker attribute.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from instructrl.v1 import rollout_pb2

log = logging.getLogger(__name__)

STAGING = ("full", "stream")


class WeightSyncExtension:
    """Methods vLLM adds to its worker; state lives in `_irl_*` instance attributes."""

    def join_weight_group(self, init_method: str, rank: int, world_size: int, backend: str,
                          timeout_s: float, group_id: str) -> None:
        """Leave any old group and start joining `group_id` on a thread.

        The rendezvous blocks until every rank is in; running it on a thread keeps
        the engine stepping meanwhile. Poll `weight_group_info()` for the outcome.
        """
        from instructrl.weight_sync.transport import WeightReceiver

        self.leave_weight_group()
        state = {"group_id": group_id, "rank": rank, "state": "joining", "error": ""}
        self._irl_join = state
        device = None if backend == "nccl" else "cpu"

        def run() -> None:
            try:
                receiver = WeightReceiver(init_method, rank, world_size, backend, timeout_s,
                                          group_id=group_id, device=device)
            except Exception as e:  # noqa: BLE001 - reported through weight_group_info
                state.update(state="failed", error=f"{type(e).__name__}: {e}"[:500])
                return
            if getattr(self, "_irl_join", None) is not state:  # superseded by a newer join
                receiver.close()
                return
            self._irl_receiver = receiver
            state["state"] = "joined"
            log.info("joined weight group %s as rank %d/%d (%s)", group_id, rank, world_size, backend)

        threading.Thread(target=run, name=f"weight-group-{group_id}", daemon=True).start()

    def leave_weight_group(self) -> None:
        receiver = getattr(self, "_irl_receiver", None)
        if receiver is not None:
            receiver.close()
        self._irl_receiver = None
        self._irl_join = None

    def receive_and_reload(self, manifest_bytes: bytes, group_id: str, timeout_s: float,
                           staging: str = "full", reuse_buffers: bool = True) -> dict:
        """Receive one update over the group and load it into the model.

        `staging="full"` receives every bucket before touching the model, so a stalled
        broadcast (`TimeoutError`) leaves the old weights intact. The staged copy is
        held in host memory: on CPU the received buckets themselves (kept between
        updates when `reuse_buffers`), on GPU each bucket is copied to the host as it
        arrives, so the GPU needs room for two buckets only, never a second model.
        `"stream"` loads each bucket as it arrives (no staged copy, transfer and load
        overlap) but a failure mid-update leaves the model partly loaded: the engine
        then refuses to serve until an update succeeds.
        Returns `{"bytes": int, "receive_s": float, "load_s": float}`.
        """
        receiver = getattr(self, "_irl_receiver", None)
        if receiver is None or receiver.pg is None:
            raise RuntimeError("no weight group joined")
        if receiver.group_id != group_id:
            raise RuntimeError(f"update for group {group_id!r} but this worker is in {receiver.group_id!r}")
        if staging not in STAGING:
            raise ValueError(f"staging must be one of {STAGING}")
        manifest = rollout_pb2.WeightManifest.FromString(manifest_bytes)
        on_host = receiver.device.type == "cpu"
        t0 = time.perf_counter()
        stream = receiver.receive(manifest, timeout_s=timeout_s,
                                  reuse_buffers=reuse_buffers and on_host and staging == "full")
        if staging == "full":
            stream = [(n, t if on_host else t.to("cpu")) for n, t in stream]
        t1 = time.perf_counter()
        with torch.no_grad():
            self.model_runner.reload_weights(weights_iterator=iter(stream), is_checkpoint_format=True)
        t2 = time.perf_counter()
        if staging == "stream":
            t1 = t0  # receive and load overlap
        return {"bytes": receiver.bytes_received, "receive_s": t1 - t0, "load_s": t2 - t1}

    def weight_group_info(self) -> dict:
        """`{"group_id", "rank", "state": none|joining|joined|failed, "error", "broken"}`."""
        join = getattr(self, "_irl_join", None) or {"group_id": "", "rank": -1, "state": "none", "error": ""}
        receiver = getattr(self, "_irl_receiver", None)
        return {**join, "broken": bool(receiver is not None and receiver.broken)}
