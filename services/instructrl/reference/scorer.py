"""Reference log-probs, transport-free: log pi_SFT(token_t | tokens_<t) of every response token.

Notation: `B` items in a batch, `L` tokens of the longest sequence in it, `K` positions
whose logits are kept, `V` vocabulary size, `T_i` response tokens of item i.

For a sequence `x` (prompt followed by response) whose response starts at `s`,

    logprob_t = log_softmax(logits[t - 1] / tau)[x_t]      for t = s .. len(x) - 1

at the temperature `tau` the responses were sampled at (the request's; 1 when unset), so the
KL penalty compares the policy and the SFT model at the same temperature (issue 14: at
tau = 0.7 it read 0.05-0.25 nats per response with actor == SFT when this was always 1).

in float32, with the model in eval mode and no grad (float32 weights on CPU; on GPU a
bf16/fp16 checkpoint keeps its dtype, `models/loading.py`, and the logits are cast to
float32 before the softmax): on CPU the same numbers as a plain transformers forward of
the unpadded sequence (within 1e-5). Batches are
right-padded, so padding never changes a real token's logits (a causal model needs
no attention mask for that, models/padding.py).
The PPO learner uses them for the KL penalty to the SFT model (InstructGPT eq. 2).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from instructrl.models.loading import check_token_ids, load_scoring_model, sequence_limits
from instructrl.models.padding import is_causal, padding_mask, right_pad
from instructrl.reference.config import ReferenceConfig
from instructrl.serving.errors import InvalidArgument


@dataclasses.dataclass
class LogProbsInput:
    token_ids: Sequence[int]   # prompt followed by response
    response_start: int        # index of the first response token
    temperature: float = 1.0   # tau: the logits are divided by it (the sampling temperature)


class ReferenceScorer:
    """Two steps so that the server can batch across requests: `prepare` one request, `forward` a batch."""

    def __init__(self, cfg: ReferenceConfig):
        from transformers import AutoModelForCausalLM

        self.device = torch.device(cfg.device)
        model = load_scoring_model(AutoModelForCausalLM, cfg)
        self.model = model.to(self.device).eval()
        self.vocab_size, self.max_seq_len, self.pad_id = sequence_limits(model, cfg.max_seq_len)
        self.name = cfg.name or pathlib.Path(cfg.model).name
        # skip the LM head on prompt positions where the model allows it
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.causal = is_causal(self.model)  # right padding then needs no attention mask

    def prepare(self, inputs: Sequence[LogProbsInput]) -> tuple[list[LogProbsInput], list[int]]:
        """Validate one request: INVALID_ARGUMENT names the item and field of the first problem."""
        if not inputs:
            raise InvalidArgument("items: empty request, nothing to score")
        items = []
        for k, x in enumerate(inputs):
            ids, s, tau = list(x.token_ids), int(x.response_start), float(x.temperature)
            if not (math.isfinite(tau) and tau > 0):
                raise InvalidArgument(f"temperature: {tau} must be finite and > 0 (0 in a request = 1)")
            if not ids:
                raise InvalidArgument(f"items[{k}].token_ids: empty")
            if len(ids) > self.max_seq_len:
                raise InvalidArgument(f"items[{k}].token_ids: {len(ids)} tokens, more than max_seq_len "
                                      f"{self.max_seq_len}")
            if not 1 <= s < len(ids):
                raise InvalidArgument(f"items[{k}].response_start: {s} is outside [1, {len(ids) - 1}] "
                                      "(the prompt needs at least one token and the response too)")
            check_token_ids(ids, self.vocab_size, f"items[{k}].token_ids")
            items.append(LogProbsInput(ids, s, tau))
        return items, [len(x.token_ids) for x in items]

    @torch.inference_mode()
    def forward(self, batch: list[LogProbsInput]) -> list[np.ndarray]:
        """Per item, the float32 (T_i,) log-probs of its T_i = len - response_start response tokens."""
        input_ids, lengths = right_pad([x.token_ids for x in batch], self.pad_id)    # (B, L), (B,)
        L = input_ids.shape[1]
        mask = padding_mask(lengths, self.causal)                                      # (B, L) or None
        input_ids = input_ids.to(self.device)
        first = min(x.response_start for x in batch) - 1  # earliest position whose logits are needed
        kw = {"logits_to_keep": L - first} if self._logits_to_keep else {}
        logits = self.model(input_ids=input_ids, attention_mask=None if mask is None else mask.to(self.device),
                            use_cache=False, **kw).logits                              # (B, K, V)
        offset = L - logits.shape[1]  # logits[:, j] are those of position offset + j
        out = []
        for i, x in enumerate(batch):
            s, n = x.response_start, len(x.token_ids)
            rows = logits[i, s - 1 - offset:n - 1 - offset].float() / x.temperature   # (T_i, V) predict s..n-1
            lp = torch.log_softmax(rows, dim=-1).gather(-1, input_ids[i, s:n, None]).squeeze(-1)  # (T_i,)
            out.append(lp.cpu().numpy())
        return out
