"""Domain types of the rollout core and the validation of a request (no gRPC, no vLLM).

`Sampling` is the one sampling-parameters type, from the rollout worker's config
(`sampling.*`) to vLLM: the client sends it as the proto's `SamplingParams` (its wire
form, 0 = unset), the servicer reads it back, `resolve_sampling` applies the defaults and
the engine turns it into vLLM's `SamplingParams`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from instructrl.config import field
from instructrl.serving.errors import InvalidArgument

Prompt = str | Sequence[int]  # text or token ids


@dataclasses.dataclass
class Sampling:
    """How to sample the responses of one Generate call."""

    n: int = field(1, help="samples per prompt")
    temperature: float = field(1.0, help="sampling temperature (0 = greedy)")
    top_p: float = field(1.0, help="nucleus sampling mass")
    top_k: int = field(0, help="top-k sampling (0 = off)")
    max_tokens: int = field(64, help="most tokens per response")
    stop: list[str] = field(default_factory=list, help="stop strings")
    seed: int | None = field(None, help="sample i of a prompt uses seed + i (vLLM's rule for n > 1); "
                                        "null = random")
    skip_special_tokens: bool = field(True, help="leave special tokens out of the returned text")


@dataclasses.dataclass
class Sample:
    index: int                 # sample index within its prompt
    token_ids: list[int]       # (T,) generated tokens
    logprobs: list[float]      # (T,) sampling log-prob of each token
    finish_reason: str         # "stop" | "length" | "abort"
    text: str = ""


@dataclasses.dataclass
class PromptOutput:
    prompt_token_ids: list[int]
    samples: list[Sample]


@dataclasses.dataclass
class GenerateResult:
    outputs: list[PromptOutput]
    policy_version: int        # version of the weights every sample was generated with


@dataclasses.dataclass
class UpdateResult:
    policy_version: int
    seconds: float
    bytes: int


def resolve_sampling(s: Sampling, *, max_n: int, max_model_len: int, default_max_tokens: int) -> Sampling:
    """Apply proto defaults (0 = unset) and check ranges; raises `InvalidArgument` naming the field."""
    n = s.n or 1
    if not 1 <= n <= max_n:
        raise InvalidArgument(f"params.n: {s.n} is outside 1..{max_n}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidArgument(f"params.temperature: {s.temperature} must be >= 0")
    top_p = s.top_p or 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument(f"params.top_p: {s.top_p} must be in (0, 1]")
    if s.top_k < -1:
        raise InvalidArgument(f"params.top_k: {s.top_k} must be >= 1, or 0/-1 for off")
    max_tokens = s.max_tokens or default_max_tokens
    if not 1 <= max_tokens < max_model_len:
        raise InvalidArgument(f"params.max_tokens: {s.max_tokens} is outside 1..{max_model_len - 1}")
    if any(not x for x in s.stop):
        raise InvalidArgument("params.stop: empty stop string")
    return dataclasses.replace(s, n=n, top_p=top_p, top_k=max(s.top_k, 0), max_tokens=max_tokens,
                               stop=list(s.stop))


def check_prompt_ids(i: int, ids: Sequence[int], vocab_size: int, max_model_len: int) -> list[int]:
    """Token ids of prompt `i`, checked: non-empty, in vocabulary, shorter than the context."""
    ids = list(ids)
    if not ids:
        raise InvalidArgument(f"prompts[{i}]: empty prompt")
    if len(ids) >= max_model_len:
        raise InvalidArgument(f"prompts[{i}]: {len(ids)} tokens; the longest prompt is "
                              f"{max_model_len - 1} (max_model_len {max_model_len})")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgument(f"prompts[{i}]: token id {bad[0]} outside the vocabulary (size {vocab_size})")
    return ids
