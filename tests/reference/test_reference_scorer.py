"""Reference scorer (no transport): numerics vs a plain transformers forward, batching, validation."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from instructrl.config import ConfigError, load
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.scorer import LogProbsInput
from instructrl.serving.errors import InvalidArgument

ATOL = 1e-5


def _inputs(seed: int, n: int) -> list[LogProbsInput]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(1, 50), rng.randint(1, 40)
        out.append(LogProbsInput([rng.randrange(0, 300) for _ in range(p + r)], p))
    return out


def _plain(model, x: LogProbsInput) -> torch.Tensor:
    """The textbook computation on one unpadded sequence: log p(x_t | x_<t), t >= response_start."""
    ids = torch.tensor([list(x.token_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0]                                   # (L, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = torch.arange(x.response_start, ids.shape[1])
    return logp[t - 1, ids[0, t]]                                       # (T,)


def _run(scorer, xs, batched=True):
    items, _ = scorer.prepare(xs)
    return scorer.forward(items) if batched else [scorer.forward([it])[0] for it in items]


def test_matches_plain_transformers_forward(sft_model_dir, reference_scorer):
    hf = AutoModelForCausalLM.from_pretrained(sft_model_dir, dtype=torch.float32).eval()
    xs = _inputs(0, 6) + [LogProbsInput([7, 8], 1)]
    got = _run(reference_scorer, xs)
    for x, lp in zip(xs, got, strict=True):
        want = _plain(hf, x)
        assert len(lp) == len(x.token_ids) - x.response_start
        assert torch.tensor(lp, dtype=torch.float32).dtype == torch.float32
        torch.testing.assert_close(torch.tensor(lp), want, atol=ATOL, rtol=0)


def test_batched_equals_unbatched_and_logits_to_keep_is_exact(reference_scorer):
    xs = _inputs(1, 8)
    batched = _run(reference_scorer, xs)
    single = _run(reference_scorer, xs, batched=False)
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(s), atol=ATOL, rtol=0)
    assert reference_scorer._logits_to_keep  # Llama supports it: prompt positions skip the LM head
    reference_scorer._logits_to_keep = False
    try:
        full = _run(reference_scorer, xs)
    finally:
        reference_scorer._logits_to_keep = True
    for b, f in zip(batched, full, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(f), atol=ATOL, rtol=0)


@pytest.mark.parametrize("items, match", [
    ([], r"items: empty"),
    ([LogProbsInput([1, 2], 1), LogProbsInput([], 0)], r"items\[1\]\.token_ids: empty"),
    ([LogProbsInput([1, 2, 3], 3)], r"items\[0\]\.response_start: 3 is outside \[1, 2\]"),
    ([LogProbsInput([1, 2, 3], 0)], r"items\[0\]\.response_start: 0"),
    ([LogProbsInput([1, 2, 3], -1)], r"items\[0\]\.response_start: -1"),
    ([LogProbsInput([1, 300, 3], 1)], r"items\[0\]\.token_ids: token id 300 at position 1"),
    ([LogProbsInput([-2, 1, 3], 1)], r"items\[0\]\.token_ids: token id -2 at position 0"),
    ([LogProbsInput([1] * 129, 1)], r"items\[0\]\.token_ids: 129 tokens, more than max_seq_len 128"),
])
def test_bad_inputs_name_item_and_field(reference_scorer, items, match):
    with pytest.raises(InvalidArgument, match=match):
        reference_scorer.prepare(items)


def test_config():
    with pytest.raises(ConfigError, match="model: required"):
        load(ReferenceConfig, None, [])
    cfg = load(ReferenceConfig, None, ["model=/m", "batching.enabled=false", "server.port=0", "torch_threads=2"])
    assert not cfg.batching.enabled and cfg.server.port == 0 and cfg.torch_threads == 2
