"""Reward scoring, transport-free: a reward model or a rule turns (prompt, response) into a float.

Notation: `B` items in a batch, `L` tokens of the longest prompt+response in it, `H` hidden size.

The model input is `prompt_ids + response_ids` (text is tokenized part by part,
no special tokens added, then concatenated). As in InstructGPT (Ouyang et al.
2022, sec. 3.5) the reward is the scalar head read at the last token of the
response; batches are right-padded and each row's score is read at position
`length - 1`, never by searching for the pad id (`models/reward_head.py`: the one
reward position that RM training, its saved statistics and the critic share). A causal model needs no attention
mask for right padding (models/padding.py); a bidirectional one gets the mask.

A scorer has two steps so that the server can batch across requests:
`prepare(inputs)` validates and tokenizes one request (raising `InvalidArgument`
that names the item and field), `forward(batch)` scores prepared items from any
number of requests in one pass.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import torch

from instructrl.config import ConfigError
from instructrl.models.loading import check_token_ids, load_scoring_model, sequence_limits
from instructrl.models.padding import is_causal, padding_mask, right_pad
from instructrl.models.prompt_format import encode_prompt
from instructrl.models.prompt_format import resolve as resolve_prompt_format
from instructrl.models.reward_head import rewards_at_last_token
from instructrl.reward.config import RewardConfig
from instructrl.serving.errors import InvalidArgument

RuleFn = Callable[[str, str, dict], float]


@dataclasses.dataclass
class ScoreInput:
    """One pair to score; `prompt`/`response` are text or token ids (not necessarily the same kind)."""

    prompt: str | Sequence[int]
    response: str | Sequence[int]
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)


class RewardScorer(Protocol):
    name: str

    def prepare(self, inputs: Sequence[ScoreInput]) -> tuple[list[Any], list[int]]:
        """Validate one request; return its prepared items and their token lengths (for batching)."""

    def forward(self, batch: list[Any]) -> Sequence[float | Exception]:
        """Raw scores of prepared items (possibly from several requests), in order."""


def load_scorer(cfg: RewardConfig) -> RewardScorer:
    return RuleReward(cfg) if cfg.rule else ModelReward(cfg)


def score(scorer: RewardScorer, inputs: Sequence[ScoreInput], batched: bool = True) -> list[float]:
    """Raw scores of one request without a server: one forward pass, or one per item."""
    items, _ = scorer.prepare(inputs)
    out = scorer.forward(items) if batched else [scorer.forward([it])[0] for it in items]
    scores: list[float] = []
    for r in out:
        if isinstance(r, Exception):
            raise r
        scores.append(r)
    return scores


def _check_request(inputs: Sequence[ScoreInput]) -> None:
    if not inputs:
        raise InvalidArgument("items: empty request, nothing to score")


class ModelReward:
    """A sequence-classification model with one label (what our RM stage saves)."""

    def __init__(self, cfg: RewardConfig):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(cfg.device)
        model = load_scoring_model(AutoModelForSequenceClassification, cfg)
        if model.config.num_labels != 1:
            raise ConfigError(f"model: {cfg.model} has {model.config.num_labels} labels; a reward model has 1")
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise ConfigError(f"model: {type(model).__name__} has no `score` head")
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        self.vocab_size, self.max_seq_len, self.pad_id = sequence_limits(model, cfg.max_seq_len)
        self.name = cfg.name or pathlib.Path(cfg.model).name
        self.causal = is_causal(self.model)  # right padding then needs no attention mask
        self.prompt_format = resolve_prompt_format(cfg.prompt_format, cfg.model)

    def _ids(self, seq: str | Sequence[int], where: str) -> list[int]:
        if isinstance(seq, str):
            return list(self.tokenizer.encode(seq, add_special_tokens=False)) if seq else []
        ids = list(seq)
        check_token_ids(ids, self.vocab_size, where)
        return ids

    def prepare(self, inputs: Sequence[ScoreInput]) -> tuple[list[list[int]], list[int]]:
        _check_request(inputs)
        items = []
        for k, x in enumerate(inputs):
            prompt = (encode_prompt(self.tokenizer, x.prompt, self.prompt_format) if isinstance(x.prompt, str)
                      else self._ids(x.prompt, f"items[{k}].prompt"))  # text: formatted as in SFT and RM data
            response = self._ids(x.response, f"items[{k}].response")
            if not response:
                raise InvalidArgument(f"items[{k}].response: empty; a response needs at least one token")
            ids = prompt + response
            if len(ids) > self.max_seq_len:
                raise InvalidArgument(f"items[{k}]: prompt+response is {len(ids)} tokens, more than "
                                      f"max_seq_len {self.max_seq_len}")
            check_token_ids(ids, self.vocab_size, f"items[{k}]")  # text tokenized with another vocabulary
            items.append(ids)
        return items, [len(ids) for ids in items]

    @torch.inference_mode()
    def forward(self, batch: list[list[int]]) -> list[float]:
        input_ids, lengths = right_pad(batch, self.pad_id)                            # (B, L), (B,)
        mask = padding_mask(lengths, self.causal)                                      # (B, L) or None
        rewards = rewards_at_last_token(self.model, input_ids.to(self.device), lengths,
                                        None if mask is None else mask.to(self.device))  # (B,)
        return rewards.cpu().tolist()


def import_rule(spec: str) -> RuleFn:
    """`package.module:function` -> the function (attribute paths like `mod:Class.method` work too)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"rule: cannot import {module_name!r}: {e}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ConfigError(f"rule: {spec!r} is not a callable")
    return obj


class RuleReward:
    """A rule `fn(prompt, response, metadata) -> float` (verifiable tasks), behind the same API.

    Token-id inputs are decoded (special tokens skipped) with the configured tokenizer.
    """

    def __init__(self, cfg: RewardConfig):
        self.fn = import_rule(cfg.rule)
        self.tokenizer = None
        if cfg.tokenizer:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.max_seq_len = cfg.max_seq_len or 4096
        self.name = cfg.name or cfg.rule

    def _text(self, seq: str | Sequence[int], where: str) -> str:
        if isinstance(seq, str):
            return seq
        if self.tokenizer is None:
            raise InvalidArgument(f"{where}: token ids need a tokenizer; this rule-based service has "
                                  "none configured (set `tokenizer` or send text)")
        ids = list(seq)
        if len(ids) > self.max_seq_len:
            raise InvalidArgument(f"{where}: {len(ids)} tokens, more than max_seq_len {self.max_seq_len}")
        check_token_ids(ids, len(self.tokenizer), where)
        return cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))

    def prepare(self, inputs: Sequence[ScoreInput]) -> tuple[list[ScoreInput], list[int]]:
        _check_request(inputs)
        items = []
        for k, x in enumerate(inputs):
            prompt = self._text(x.prompt, f"items[{k}].prompt")
            response = self._text(x.response, f"items[{k}].response")
            if len(x.response) == 0:
                raise InvalidArgument(f"items[{k}].response: empty")
            items.append(ScoreInput(prompt, response, dict(x.metadata)))
        return items, [1] * len(items)  # rules cost no tokens; the batcher counts items

    def forward(self, batch: list[ScoreInput]) -> list[float | Exception]:
        out: list[float | Exception] = []
        for x in batch:  # one bad item fails alone (ValueError -> INVALID_ARGUMENT)
            try:
                r = self.fn(cast(str, x.prompt), cast(str, x.response), dict(x.metadata))  # text after prepare
                if not isinstance(r, numbers.Real) or not math.isfinite(r):
                    raise RuntimeError(f"rule {self.name} returned {r!r}, not a finite number")
                out.append(float(r))
            except Exception as e:  # noqa: BLE001 - reported for this item only
                out.append(e)
        return out
