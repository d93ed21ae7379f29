"""Pretraining text for PPO-ptx (Ouyang et al. 2022 eq. 2: + gamma * E_pretrain[log pi(x)]).

Reads `.txt` (one document a line) or `.jsonl` (a `text` field per line), tokenizes once,
truncates to `max_len`, and hands out right-padded batches in a fixed shuffled order that
depends only on (seed, position): `position` is saved in the checkpoint, so a resumed run
continues where it stopped. Each rank reads a disjoint stride of every global batch.

Notation: B sequences, L length after padding.
"""
from __future__ import annotations

import json

import torch


def read_texts(path: str) -> list[str]:
    """Documents of `path` (.jsonl: the `text` field of each line; else one document a line)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            texts.append(json.loads(line)["text"] if path.endswith(".jsonl") else line)
    if not texts:
        raise ValueError(f"{path}: no pretraining text")
    return texts


class PtxData:
    """Cycles over tokenized documents; `next_batch()` -> (input_ids, attention_mask, labels)."""

    def __init__(self, path: str, tokenizer, batch_size: int, max_len: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.docs = [ids[:max_len] for ids in tokenizer(read_texts(path), add_special_tokens=False)["input_ids"]]
        self.docs = [d for d in self.docs if len(d) >= 2]  # one token predicts nothing
        if not self.docs:
            raise ValueError(f"{path}: every document is shorter than 2 tokens")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.position = 0  # global batches handed out so far (same on every rank)
        self._epoch, self._perm = -1, list[int]()

    def _order(self, epoch: int) -> list[int]:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.docs), generator=g).tolist()
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch.

        Returns `input_ids` `(B, L)` int64, `attention_mask` `(B, L)`, `labels` `(B, L)` with
        -100 on padding (`instructrl.rl.lm_loss` shifts them).
        """
        per_global = self.batch_size * self.world
        ids = []
        for j in range(self.batch_size):
            k = self.position * per_global + self.rank * self.batch_size + j  # global document slot
            epoch, i = divmod(k, len(self.docs))
            ids.append(self.docs[self._order(epoch)[i]])
        self.position += 1
        L = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), L), dtype=torch.long)
        for b, x in enumerate(ids):
            input_ids[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = 1
        labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
        return input_ids, mask, labels

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
