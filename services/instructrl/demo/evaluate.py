"""Held-out evaluation for the demo: greedy responses, gold score, reward-model score.

Generation here uses transformers (left-padded batches, greedy) so that SFT, PPO
checkpoints and the larger SFT baseline are judged the same way, outside the
services under test. The gold score is the task's programmatic labeler; the proxy
score is the trained reward model read at the last real token.
"""
from __future__ import annotations

import dataclasses
import pathlib
import statistics
from collections.abc import Sequence

import torch

from instructrl.demo.task import gold_score, parse_prompt


@dataclasses.dataclass
class EvalResult:
    name: str
    responses: list[str]
    gold: list[float]
    proxy: list[float]

    @property
    def gold_mean(self) -> float:
        return statistics.fmean(self.gold)

    @property
    def proxy_mean(self) -> float:
        return statistics.fmean(self.proxy) if self.proxy else float("nan")

    def gold_by_task(self, prompts: Sequence[str]) -> dict[str, float]:
        by: dict[str, list[float]] = {}
        for p, g in zip(prompts, self.gold, strict=True):
            by.setdefault(parse_prompt(p)[0], []).append(g)
        return {k: statistics.fmean(v) for k, v in sorted(by.items())}


@torch.no_grad()
def generate(model_dir: str | pathlib.Path, prompts: Sequence[str], max_new_tokens: int = 16,
             batch_size: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Responses of the causal LM in `model_dir` (decoded, special tokens dropped): greedy when
    `temperature` is 0, else sampled at that temperature with a fixed seed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: list[str] = []
    torch.manual_seed(seed)
    sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    for i in range(0, len(prompts), batch_size):
        chunk = [tok(p, add_special_tokens=False).input_ids for p in prompts[i:i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(chunk):  # left padding so every row continues from its last token
            ids[r, width - len(seq):] = torch.tensor(seq)
            mask[r, width - len(seq):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             **sample, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in gen[:, width:]:
            out.append(str(tok.decode(row.tolist(), skip_special_tokens=True)))
    return out


@torch.no_grad()
def rm_scores(rm_dir: str | pathlib.Path, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 64) -> list[float]:
    """Reward-model score of each (prompt, response), read at the last real token of
    prompt_ids + response_ids + eos (the sequence convention of the whole system)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    scores: list[float] = []
    for i in range(0, len(prompts), batch_size):
        chunk = zip(prompts[i:i + batch_size], responses[i:i + batch_size], strict=True)
        seqs = [tok(p, add_special_tokens=False).input_ids + tok(r, add_special_tokens=False).input_ids
                + [tok.eos_token_id] for p, r in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(1) - 1
        values = model.score(hidden[torch.arange(len(seqs)), last]).squeeze(-1)
        scores += values.tolist()
    return scores


def evaluate(name: str, model_dir: str | pathlib.Path, prompts: Sequence[str],
             rm_dir: str | pathlib.Path | None = None, max_new_tokens: int = 16,
             temperature: float = 0.0, seed: int = 0) -> EvalResult:
    """Responses of `model_dir` on `prompts` (greedy, or sampled at `temperature`), judged by
    the gold labeler and the RM."""
    responses = generate(model_dir, prompts, max_new_tokens, temperature=temperature, seed=seed)
    gold = [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]
    proxy = rm_scores(rm_dir, prompts, responses) if rm_dir else []
    return EvalResult(name, responses, gold, proxy)


def win_rate(a: EvalResult, b: EvalResult) -> float:
    """How often the labeler prefers `a`'s response to `b`'s on the same prompt (ties count half)."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a.gold, b.gold, strict=True))
    return wins / len(a.gold)


def paired_se(a: EvalResult, b: EvalResult) -> float:
    """Standard error of mean(a.gold - b.gold) over the same prompts (paired)."""
    diffs = [x - y for x, y in zip(a.gold, b.gold, strict=True)]
    return statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
