"""JSONL readers, validators, tokenisation and collation for the offline stages.

File formats (one JSON object a line; blank lines are skipped; other keys are ignored):

- demonstrations (SFT):  ``{"prompt": str, "response": str}``
- rankings (RM):         ``{"prompt": str, "responses": [best, ..., worst]}``, K = 2..9,
                         or ``{"prompt": str, "chosen": str, "rejected": str}`` (K = 2)
- pairs (DPO):           ``{"prompt": str, "chosen": str, "rejected": str}``; a ranking line
                         is also accepted and becomes all its C(K,2) pairs

A bad line raises ``DataError("FILE:LINE: field 'responses': ...")``.

Sequence convention (the whole system): input = prompt ids + response ids, each
tokenised separately with no special tokens, the prompt after its prompt format
(``models/prompt_format.py``: raw, the chat template, or a format string); the response ends with the EOS id
(``append_eos``), so a policy learns to stop and the reward model scores the
same last token that a finished rollout ends with. Sequences are right-padded.

Notation: B prompts (or pairs) in a batch, K responses per prompt, N sequences,
L padded sequence length.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from instructrl.models.prompt_format import RAW, encode_prompt

MIN_K, MAX_K = 2, 9
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: tuple[str, ...]  # best first


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------- reading and validation

def iter_jsonl(path: str | pathlib.Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield ``(where, line_number, object)``; ``where`` is ``"FILE:LINE"`` for error messages."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    count = 0
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            count += 1
            yield where, lineno, obj
    if count == 0:
        raise DataError(f"{p}: no records")


def _string(where: str, obj: dict, key: str, nonempty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: field '{key}': missing")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: field '{key}': empty")
    return value


def _ranking(where: str, obj: dict) -> Ranking:
    prompt = _string(where, obj, "prompt", nonempty=True)
    has_pair = "chosen" in obj or "rejected" in obj
    if "responses" in obj and has_pair:
        raise DataError(f"{where}: field 'responses': give either 'responses' or 'chosen'/'rejected', not both")
    if has_pair:
        return Ranking(prompt, (_string(where, obj, "chosen"), _string(where, obj, "rejected")))
    if "responses" not in obj:
        raise DataError(f"{where}: field 'responses': missing (give 'responses' best first, "
                        "or 'chosen' and 'rejected')")
    responses = obj["responses"]
    if not isinstance(responses, list):
        raise DataError(f"{where}: field 'responses': expected a list of {MIN_K} to {MAX_K} strings, "
                        f"got {type(responses).__name__}")
    if not MIN_K <= len(responses) <= MAX_K:
        raise DataError(f"{where}: field 'responses': K = {len(responses)} responses; "
                        f"need {MIN_K} to {MAX_K}, best first")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"{where}: field 'responses[{i}]': expected a string, got {type(r).__name__}")
    return Ranking(prompt, tuple(responses))


def read_demonstrations(path: str | pathlib.Path) -> list[Demonstration]:
    """SFT records; DataError naming FILE:LINE and the field on the first bad line."""
    return [Demonstration(_string(w, o, "prompt", nonempty=True), _string(w, o, "response"))
            for w, _, o in iter_jsonl(path)]


def read_rankings(path: str | pathlib.Path) -> list[Ranking]:
    """RM records, K-wise (``responses`` best first) or pairwise (``chosen``/``rejected``)."""
    return [_ranking(w, o) for w, _, o in iter_jsonl(path)]


def read_pairs(path: str | pathlib.Path) -> list[Pair]:
    """DPO pairs; a K-wise ranking line contributes all C(K,2) (better, worse) pairs."""
    out = []
    for where, _, obj in iter_jsonl(path):
        rk = _ranking(where, obj)
        r = rk.responses
        out += [Pair(rk.prompt, r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
    return out


def split_holdout(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a seeded random ``fraction`` of records held out (none if it rounds to 0)."""
    n_eval = int(round(len(records) * fraction))
    if n_eval == 0 or n_eval >= len(records):
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---------------------------------------------------------------- tokenisation

@dataclasses.dataclass
class Encoded:
    """One prompt + response sequence: ``input_ids`` and ``labels`` (IGNORE_INDEX on the prompt)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_pair(tokenizer, prompt: str, response: str, max_length: int, append_eos: bool,
                prompt_format: str = RAW) -> Encoded:
    """Tokenise the formatted prompt and the response separately (no special tokens) and concatenate.

    ``labels`` equal ``input_ids`` on response tokens (EOS included) and ``IGNORE_INDEX``
    on prompt tokens. Longer sequences are cut at ``max_length`` from the right.
    """
    p = encode_prompt(tokenizer, prompt, prompt_format)  # models/prompt_format.py: as every service does
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if append_eos:
        r = r + [tokenizer.eos_token_id]
    ids = p + r
    labels = [IGNORE_INDEX] * len(p) + r
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def encode_demonstrations(tokenizer, records: Sequence[Demonstration], max_length: int,
                          append_eos: bool, prompt_format: str = RAW) -> list[Encoded]:
    return [encode_pair(tokenizer, d.prompt, d.response, max_length, append_eos, prompt_format) for d in records]


def encode_rankings(tokenizer, records: Sequence[Ranking], max_length: int,
                    append_eos: bool, prompt_format: str = RAW) -> list[list[Encoded]]:
    """Per prompt, its K encoded sequences, best first."""
    return [[encode_pair(tokenizer, rk.prompt, r, max_length, append_eos, prompt_format) for r in rk.responses]
            for rk in records]


def encode_pairs(tokenizer, records: Sequence[Pair], max_length: int,
                 append_eos: bool, prompt_format: str = RAW) -> list[tuple[Encoded, Encoded]]:
    return [(encode_pair(tokenizer, p.prompt, p.chosen, max_length, append_eos, prompt_format),
             encode_pair(tokenizer, p.prompt, p.rejected, max_length, append_eos, prompt_format)) for p in records]


# ---------------------------------------------------------------- collation

def collate_sequences(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the batch's longest sequence.

    Returns ``input_ids`` ``(N, L)`` (``pad_id`` on padding), ``attention_mask`` ``(N, L)``
    (1 = real token), ``labels`` ``(N, L)`` (IGNORE_INDEX on prompt and padding) and
    ``last_index`` ``(N,)`` (position of each sequence's last real token).
    """
    n, length = len(batch), max(len(e.input_ids) for e in batch)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        attention_mask[i, :k] = 1
    last_index = attention_mask.sum(dim=1) - 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "last_index": last_index}


def collate_rankings(batch: Sequence[Sequence[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch element = one prompt with all its K_b responses (InstructGPT's K-wise batching).

    Only real sequences are run through the model: the N = sum_b K_b sequences are
    flattened, and ``prompt_index``/``rank`` say where each score goes in the
    ``(B, K)`` reward matrix (K = the batch's largest K_b) that ``kwise_ranking_loss``
    receives with ``num_responses``.

    Returns the ``collate_sequences`` tensors for the N sequences plus ``prompt_index``
    ``(N,)``, ``rank`` ``(N,)`` (0 = best) and ``num_responses`` ``(B,)``.
    """
    flat = [e for group in batch for e in group]
    out = collate_sequences(flat, pad_id)
    out["prompt_index"] = torch.tensor([b for b, group in enumerate(batch) for _ in group], dtype=torch.long)
    out["rank"] = torch.tensor([k for group in batch for k in range(len(group))], dtype=torch.long)
    out["num_responses"] = torch.tensor([len(group) for group in batch], dtype=torch.long)
    return out


def scatter_rewards(scores: torch.Tensor, prompt_index: torch.Tensor, rank: torch.Tensor,
                    num_prompts: int) -> torch.Tensor:
    """``(N,)`` sequence scores -> ``(B, K)`` reward matrix (padding columns 0), keeping the graph."""
    k = int(rank.max()) + 1
    return scores.new_zeros((num_prompts, k)).index_put((prompt_index, rank), scores)


def collate_pairs(batch: Sequence[tuple[Encoded, Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences in rows ``0..B-1``, rejected in rows ``B..2B-1`` (one forward pass for both)."""
    return collate_sequences([c for c, _ in batch] + [r for _, r in batch], pad_id)


def batch_indices(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """Index lists of one epoch for this rank: a seeded permutation, each global batch split across ranks.

    The last, short global batch is kept (every example is seen once per epoch) unless
    it has fewer examples than ranks: every rank must take the same number of steps.
    """
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    step = batch_size * world
    out = []
    for start in range(0, n, step):
        chunk = order[start:start + step]
        if len(chunk) < world:
            break
        out.append(chunk[rank::world])
    return out


def read_splits(data_cfg, seed: int, read: Callable[[str], list]) -> tuple[list, list]:
    """`(train records, held-out records)`: `data_cfg.eval_file`, or `eval_fraction` of the
    train records held out with `seed`."""
    records = read(data_cfg.train_file)
    if data_cfg.eval_file:
        return records, read(data_cfg.eval_file)
    return split_holdout(records, data_cfg.eval_fraction, seed)


def load_splits(tok, data_cfg, seed: int, read: Callable[[str], list], encode: Callable) -> tuple[list, list]:
    """Read `data_cfg.train_file` (and `eval_file`, or hold out `eval_fraction` of the train
    records with `seed`), then tokenise both with `encode(tok, records, max_length, append_eos,
    prompt_format)` (`data_cfg.prompt_format` resolved by the stage). The one data prelude of
    the SFT, RM and DPO stages."""
    records, eval_records = read_splits(data_cfg, seed, read)
    args = (data_cfg.max_length, data_cfg.append_eos, data_cfg.prompt_format)
    return encode(tok, records, *args), encode(tok, eval_records, *args)
