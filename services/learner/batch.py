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
from typing import Sequence

import torch
import torch.distributed as dist

from instructrl.codec import decode
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

    FIELDS = ("input_ids", "attention_mask", "positions", "response_ids", "response_mask",
              "sampling_logprobs", "ref_logprobs", "scores", "lags")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | slice) -> "ExperienceBatch":
        """The records at `idx` (a slice or an index tensor)."""
        return ExperienceBatch(**{f: getattr(self, f)[idx] for f in self.FIELDS})

    def to(self, device: torch.device | str) -> "ExperienceBatch":
        return ExperienceBatch(**{f: getattr(self, f).to(device) for f in self.FIELDS})

    @property
    def num_tokens(self) -> int:
        """Real response tokens in the batch."""
        return int(self.response_mask.sum().item())


def from_records(records: Sequence[experience_pb2.Experience], lags: Sequence[int],
                 pad_id: int) -> ExperienceBatch:
    """Pad `records` into an `ExperienceBatch` (right padding)."""
    if not records:
        raise ValueError("empty batch")
    prompts = [decode(r.prompt_token_ids).long().reshape(-1) for r in records]
    responses = [decode(r.response_token_ids).long().reshape(-1) for r in records]
    B = len(records)
    L = max(p.numel() + a.numel() for p, a in zip(prompts, responses))
    T = max(a.numel() for a in responses)
    out = ExperienceBatch(
        input_ids=torch.full((B, L), pad_id, dtype=torch.long),
        attention_mask=torch.zeros((B, L), dtype=torch.long),
        positions=torch.zeros((B, T), dtype=torch.long),
        response_ids=torch.zeros((B, T), dtype=torch.long),
        response_mask=torch.zeros((B, T), dtype=torch.float32),
        sampling_logprobs=torch.zeros((B, T), dtype=torch.float32),
        ref_logprobs=torch.zeros((B, T), dtype=torch.float32),
        scores=torch.tensor([r.score for r in records], dtype=torch.float32),
        lags=torch.tensor(list(lags), dtype=torch.long),
    )
    for b, (rec, p, a) in enumerate(zip(records, prompts, responses)):
        P, Tb = p.numel(), a.numel()
        if P == 0:
            raise ValueError(f"record {rec.sample_id}: empty prompt (no token to predict the first response token)")
        out.input_ids[b, :P + Tb] = torch.cat([p, a])
        out.attention_mask[b, :P + Tb] = 1
        out.positions[b, :Tb] = torch.arange(P - 1, P + Tb - 1)  # logits[i] predict token i + 1
        out.response_ids[b, :Tb] = a
        out.response_mask[b, :Tb] = 1.0
        out.sampling_logprobs[b, :Tb] = decode(rec.sampling_logprobs).float().reshape(-1)
        out.ref_logprobs[b, :Tb] = decode(rec.ref_logprobs).float().reshape(-1)
    return out


def fresh_records(records: Sequence[experience_pb2.Experience], lags: Sequence[int],
                  seen: set[str]) -> tuple[list[experience_pb2.Experience], list[int]]:
    """Drop records whose sample_id is in `seen` (trained, not yet committed) and add the rest to it."""
    keep, keep_lags = [], []
    for rec, lag in zip(records, lags):
        if rec.sample_id in seen:
            continue
        seen.add(rec.sample_id)
        keep.append(rec)
        keep_lags.append(lag)
    return keep, keep_lags


# --- shipping a batch from rank 0 to every rank ------------------------------------
# Header (int64): B, L, T, then the control flags every rank must act on together.
HEADER = ("B", "L", "T", "stop", "save", "sync", "path_len")
_DTYPES = {"input_ids": torch.long, "attention_mask": torch.long, "positions": torch.long,
           "response_ids": torch.long, "response_mask": torch.float32,
           "sampling_logprobs": torch.float32, "ref_logprobs": torch.float32,
           "scores": torch.float32, "lags": torch.long}


def _shape(name: str, B: int, L: int, T: int) -> tuple[int, ...]:
    if name in ("input_ids", "attention_mask"):
        return (B, L)
    if name in ("scores", "lags"):
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
    h = dict(zip(HEADER, header.tolist()))
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
