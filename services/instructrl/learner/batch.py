"""Experience records -> right-padded training tensors, and shipping them to every rank.

Sequence convention: the model input is `prompt_token_ids + response_token_ids`; the
logits at position i predict token i + 1, so response token t of record b (at input
position P_b + t) is scored by the logits at `positions[b, t] = P_b + t - 1`, and its
state value V(s_t) is read at the same position.

Notation: B records, L = max(P_b + T_b) input length, T = max(T_b) response length.
Everything is right-padded; `response_mask` marks real response tokens.

Rank 0 alone reads Redis; it ships the padded tensors to the other ranks with
`torch.distributed.broadcast` (a fixed header, then each tensor): raw tensors only,
nothing pickled.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from instructrl.buffer.experience import record_temperature
from instructrl.codec import logprob_array, token_array
from instructrl.v1 import experience_pb2


@dataclasses.dataclass
class ExperienceBatch:
    """One batch of experience as padded tensors (CPU)."""

    input_ids: torch.Tensor  # (B, L) int64 prompt + response tokens, pad_id after the end
    attention_mask: torch.Tensor  # (B, L) int64 1 on real tokens
    positions: torch.Tensor  # (B, T) int64 position whose logits/value belong to response token t
    response_ids: torch.Tensor  # (B, T) int64 a_t, 0 on padding
    response_mask: torch.Tensor  # (B, T) float32 1.0 on real response tokens
    sampling_logprobs: torch.Tensor  # (B, T) float32 log pi_rollout(a_t | s_t) as sampled
    ref_logprobs: torch.Tensor  # (B, T) float32 log pi_SFT(a_t | s_t)
    scores: torch.Tensor  # (B,) float32 reward-model score r_phi(x, y)
    lags: torch.Tensor  # (B,) int64 learner version - record version when read
    temperatures: torch.Tensor  # (B,) float32 tau the response was sampled at (the actor's logits / tau)

    FIELDS = ("input_ids", "attention_mask", "positions", "response_ids", "response_mask",
              "sampling_logprobs", "ref_logprobs", "scores", "lags", "temperatures")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | slice) -> ExperienceBatch:
        """The records at `idx` (a slice or an index tensor)."""
        return ExperienceBatch(**{f: getattr(self, f)[idx] for f in self.FIELDS})

    def to(self, device: torch.device | str) -> ExperienceBatch:
        return ExperienceBatch(**{f: getattr(self, f).to(device) for f in self.FIELDS})

    @property
    def num_tokens(self) -> int:
        """Real response tokens in the batch."""
        return int(self.response_mask.sum().item())


def from_records(records: Sequence[experience_pb2.Experience], lags: Sequence[int],
                 pad_id: int) -> ExperienceBatch:
    """Pad `records` into an `ExperienceBatch` (right padding).

    The per-token tensors are read as numpy views of their raw bytes (INT32 ids, FP32
    log-probs) and copied once, into the padded arrays."""
    if not records:
        raise ValueError("empty batch")
    prompts = [token_array(r.prompt_token_ids, "prompt_token_ids") for r in records]
    responses = [token_array(r.response_token_ids, "response_token_ids") for r in records]
    B = len(records)
    L = max(p.size + a.size for p, a in zip(prompts, responses, strict=True))
    T = max(a.size for a in responses)
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, L), dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    response_ids = np.zeros((B, T), dtype=np.int64)
    response_mask = np.zeros((B, T), dtype=np.float32)
    sampling_logprobs = np.zeros((B, T), dtype=np.float32)
    ref_logprobs = np.zeros((B, T), dtype=np.float32)
    for b, (rec, p, a) in enumerate(zip(records, prompts, responses, strict=True)):
        P, Tb = p.size, a.size
        if P == 0:
            raise ValueError(f"record {rec.sample_id}: empty prompt (no token to predict the first response token)")
        input_ids[b, :P] = p
        input_ids[b, P:P + Tb] = a
        attention_mask[b, :P + Tb] = 1
        positions[b, :Tb] = np.arange(P - 1, P + Tb - 1)  # logits[i] predict token i + 1
        response_ids[b, :Tb] = a
        response_mask[b, :Tb] = 1.0
        sampling_logprobs[b, :Tb] = logprob_array(rec.sampling_logprobs, "sampling_logprobs")
        ref_logprobs[b, :Tb] = logprob_array(rec.ref_logprobs, "ref_logprobs")
    return ExperienceBatch(
        input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
        positions=torch.from_numpy(positions), response_ids=torch.from_numpy(response_ids),
        response_mask=torch.from_numpy(response_mask), sampling_logprobs=torch.from_numpy(sampling_logprobs),
        ref_logprobs=torch.from_numpy(ref_logprobs),
        scores=torch.tensor([r.score for r in records], dtype=torch.float32),
        lags=torch.tensor(list(lags), dtype=torch.long),
        temperatures=torch.tensor([record_temperature(r) for r in records], dtype=torch.float32))


# --- shipping a batch from rank 0 to every rank ------------------------------------
# Header (int64): B, L, T, then the control flags every rank must act on together.
HEADER = ("B", "L", "T", "stop", "save", "sync", "path_len")
_DTYPES = {"input_ids": torch.long, "attention_mask": torch.long, "positions": torch.long,
           "response_ids": torch.long, "response_mask": torch.float32,
           "sampling_logprobs": torch.float32, "ref_logprobs": torch.float32,
           "scores": torch.float32, "lags": torch.long, "temperatures": torch.float32}


def _shape(name: str, B: int, L: int, T: int) -> tuple[int, ...]:
    if name in ("input_ids", "attention_mask"):
        return (B, L)
    if name in ("scores", "lags", "temperatures"):
        return (B,)
    return (B, T)


def broadcast_batch(batch: ExperienceBatch | None, control: dict[str, int], save_path: str = "",
                    device: torch.device | str = "cpu", src: int = 0
                    ) -> tuple[ExperienceBatch | None, dict[str, int], str]:
    """Send (on `src`) or receive (elsewhere) one batch plus the control flags and save path.

    `control` holds `stop`, `save`, `sync` (ints); `batch` may be None (nothing to train).
    Every rank gets the batch on `device` (the backend's: cuda for NCCL, cpu for gloo).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return (batch.to(device) if batch is not None else None), control, save_path
    sending = dist.get_rank() == src
    header = torch.zeros(len(HEADER), dtype=torch.long, device=device)
    path_bytes = save_path.encode()
    if sending:
        B, L, T = (0, 0, 0) if batch is None else (len(batch), batch.input_ids.shape[1], batch.response_ids.shape[1])
        header.copy_(torch.tensor([B, L, T, control.get("stop", 0), control.get("save", 0),
                                   control.get("sync", 0), len(path_bytes)], device=device))
    dist.broadcast(header, src)
    h = dict(zip(HEADER, header.tolist(), strict=True))
    if h["B"] > 0:
        tensors = {}
        for name in ExperienceBatch.FIELDS:
            t = getattr(batch, name).to(device).contiguous() if sending else torch.empty(
                _shape(name, h["B"], h["L"], h["T"]), dtype=_DTYPES[name], device=device)
            dist.broadcast(t, src)
            tensors[name] = t
        batch = ExperienceBatch(**tensors)
    else:
        batch = None
    if h["path_len"] > 0:
        buf = (torch.tensor(list(path_bytes), dtype=torch.uint8, device=device) if sending
               else torch.empty(h["path_len"], dtype=torch.uint8, device=device))
        dist.broadcast(buf, src)
        save_path = bytes(buf.tolist()).decode()
    return batch, {k: h[k] for k in ("stop", "save", "sync")}, save_path
