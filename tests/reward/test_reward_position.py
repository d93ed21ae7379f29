"""One reward position (issue 14 item 2): `instructrl rm`'s own held-out scores, its saved
normalisation statistics, the reward service and the critic all read the same token.

Run twice: with a tokenizer whose pad token is its EOS (GPT-2, Llama-3 base), where
transformers' sequence-classification pooling would read the token *before* the EOS the
data appends, and with a distinct pad token.
"""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from instructrl.config import from_dict
from instructrl.demo import task as T
from instructrl.learner.models import load_critic
from instructrl.models.tiny import TinyModelConfig, build_tiny_llama, build_tokenizer
from instructrl.offline import rm
from instructrl.reward.client import RewardClient
from instructrl.reward.config import NormalizationConfig, RewardConfig
from instructrl.reward.server import reward_server
from instructrl.serving.batcher import BatchingConfig
from instructrl.serving.client import ClientConfig
from instructrl.serving.server import ServerConfig

ATOL = 1e-5
TINY = TinyModelConfig(vocab_size=320, hidden_size=64, num_heads=2, num_layers=1, max_position_embeddings=128)


def _sft_like_model(out, pad_is_eos: bool):
    tok = build_tokenizer(T.tokenizer_corpus(n=300), TINY.vocab_size, out)
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    build_tiny_llama(out, TINY, tokenizer=tok)
    return tok


def _train_rm(tmp_path, pad_is_eos: bool):
    base = tmp_path / "base"
    tok = _sft_like_model(base, pad_is_eos)
    assert (tok.pad_token_id == tok.eos_token_id) == pad_is_eos
    files = {"train": T.write_jsonl(tmp_path / "rk.jsonl", T.make_rankings(48, seed=0)),
             "eval": T.write_jsonl(tmp_path / "rk_eval.jsonl", T.make_rankings(6, seed=1, split="eval")),
             "demos": T.write_jsonl(tmp_path / "demos.jsonl", T.make_demonstrations(10, seed=2))}
    cfg = from_dict(rm.RMConfig, {
        "model": str(base), "output_dir": str(tmp_path / "rm"),
        "data": {"train_file": str(files["train"]), "eval_file": str(files["eval"]),
                 "demonstrations_file": str(files["demos"]), "max_length": 64},
        "train": {"max_steps": 3, "micro_batch_size": 4, "progress": False},
        "optim": {"lr": 1e-3},
    })
    rm.train(cfg)
    return tmp_path / "rm", tok, files


def _ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """The system's sequence: prompt and response tokenised apart, the response ending with EOS."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    return p, tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


async def _serve_and_score(cfg: RewardConfig, items) -> tuple[list[float], list[float]]:
    srv = await reward_server(cfg).start()
    try:
        async with RewardClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as client:
            return await client.score(items)
    finally:
        await srv.stop(0)


@pytest.mark.parametrize("pad_is_eos", [True, False], ids=["pad==eos", "distinct-pad"])
def test_rm_eval_scores_saved_stats_service_and_critic_read_one_token(tmp_path, pad_is_eos):
    rm_dir, tok, files = _train_rm(tmp_path, pad_is_eos)
    rows = [json.loads(line) for line in (rm_dir / rm.EVAL_SCORES).read_text().splitlines()]
    assert len(rows) >= 12
    items = [_ids(tok, r["prompt"], r["response"]) for r in rows]
    server = ServerConfig(port=0, metrics_port=-1)
    cfg = RewardConfig(model=str(rm_dir), server=server, batching=BatchingConfig(max_wait_ms=5))

    # 1. the reward service's raw scores equal `instructrl rm`'s own held-out scores
    _, raw = asyncio.run(_serve_and_score(cfg, items))
    assert raw == pytest.approx([r["score"] for r in rows], abs=ATOL)

    # 2. the saved statistics were measured at that token: the demonstrations, scored by the
    #    service with `normalization.source=saved`, have mean 0 and std 1
    demos = [json.loads(line) for line in files["demos"].read_text().splitlines()]
    cfg.normalization = NormalizationConfig(enabled=True, source="saved")
    normed, _ = asyncio.run(_serve_and_score(cfg, [_ids(tok, d["prompt"], d["response"]) for d in demos]))
    normed_t = torch.tensor(normed, dtype=torch.float64)
    assert abs(float(normed_t.mean())) < 1e-4 and abs(float(normed_t.std()) - 1.0) < 1e-4

    # 3. the critic initialised from the RM gives, at the last real token, the RM's reward
    critic = load_critic(str(rm_dir), str(rm_dir))
    with torch.no_grad():
        for (p, r), want in zip(items[:4], raw[:4], strict=True):
            ids = torch.tensor([p + r])
            values = critic(ids, torch.ones_like(ids))                 # (1, L)
            assert float(values[0, -1]) == pytest.approx(want, abs=ATOL)
