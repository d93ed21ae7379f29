"""Where a scalar-head model is read: the one reward position of the whole system.

Notation: `B` sequences, `L` tokens of the longest (right-padded), `H` hidden size.

A reward model (and the critic initialised from it) is a `...ForSequenceClassification`
with one label: a backbone and a linear `score` head. The reward r(x, y) is the head
read at the **last real token** of prompt ids + response ids, i.e. at position
`length - 1` of each right-padded row (InstructGPT, Ouyang et al. 2022, sec. 3.5: the
reward is read at the end of the response, which ends with EOS as a finished rollout
does).

We never use transformers' own pooling (`...ForSequenceClassification.forward`): it
reads the rightmost token that is not `pad_token_id`, and when a tokenizer has no pad
token (GPT-2, Llama-3 base) pad falls back to EOS, so it reads the token *before* the
appended EOS while a service reading `length - 1` reads the EOS itself. Every reader
of a scalar head goes through this module instead:

- `instructrl rm` (training loss, held-out scores, the saved normalisation statistics):
  `ScalarHeadModel` values, then `at_reward_position`;
- the reward service: `rewards_at_last_token` (the head on the last real token only);
- the learner's critic: `ScalarHeadModel` values at every position (V(s_t)), whose value
  at the reward position is the RM's reward, as it was trained.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def reward_index(lengths: torch.Tensor) -> torch.Tensor:
    """`(B,)` int64 position of each right-padded row's last real token: `length - 1`."""
    return lengths.long() - 1


def lengths_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` real-token counts of a right-padded `(B, L)` attention mask (1 = real token)."""
    return attention_mask.long().sum(dim=1)


def at_reward_position(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` per-position head outputs `values` `(B, L)` read at each row's reward position."""
    index = reward_index(lengths_of(attention_mask)).to(values.device)
    return values.gather(1, index[:, None]).squeeze(1)


def backbone_of(seq_cls: Any) -> nn.Module:
    """The transformer under a sequence classifier (`model`, `transformer`, `gpt_neox`, ...)."""
    return getattr(seq_cls, seq_cls.base_model_prefix)


class ScalarHeadModel(nn.Module):
    """A sequence classifier's backbone + its scalar `score` head, applied at every position.

    Parameters keep the classifier's names under `seq_cls.`, so a reward model's weights
    load as they are and `seq_cls` saves as a plain HF directory.
    """

    def __init__(self, seq_cls: Any):
        super().__init__()
        if not isinstance(getattr(seq_cls, "score", None), nn.Module):
            raise ValueError(f"{type(seq_cls).__name__} has no `score` head; a reward model or critic is a "
                             "...ForSequenceClassification model with a scalar `score` layer")
        self.seq_cls: Any = seq_cls

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Head outputs `(B, L)` float32 at every position.

        Args:
            input_ids: `(B, L)` int64 tokens, right-padded.
            attention_mask: `(B, L)` 1 on real tokens (None: a causal model needs none for right padding).
        """
        hidden = backbone_of(self.seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                           use_cache=False).last_hidden_state     # (B, L, H)
        return self.seq_cls.score(hidden).squeeze(-1).float()                    # (B, L)


def rewards_at_last_token(seq_cls: Any, input_ids: torch.Tensor, lengths: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`(B,)` float32 rewards: the head on each row's last real token only (the serving path).

    Equal to `at_reward_position(ScalarHeadModel(seq_cls)(...))` without running the head on
    every position.
    """
    hidden = backbone_of(seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state              # (B, L, H)
    index = reward_index(lengths).to(hidden.device)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]     # (B, H)
    return seq_cls.score(last).squeeze(-1).float()                                # (B,)
