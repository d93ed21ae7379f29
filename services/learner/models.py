"""The actor (policy) and the critic (value function) as torch modules.

- Actor: `AutoModelForCausalLM` from the SFT directory.
- Critic: initialised from the reward model, as InstructGPT did (Ouyang et al. 2022,
  sec. 3.5: "we initialize the value function from the RM"). Our RM stage saves a
  `...ForSequenceClassification` with `num_labels=1`; its forward pools the score at
  the last token only, so the critic calls the classifier's backbone and its `score`
  head itself, at *every* position, giving V(s) for each prefix: values `(B, L)`.
  Without an RM (tests, ablations) the critic starts from the SFT directory with a
  fresh scalar head initialised to zero (values start at 0).

Notation: B batch, L full sequence length (prompt + response, right-padded).
"""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_actor(path: str, dtype: str = "float32") -> nn.Module:
    """The policy: a Hugging Face causal LM from `path`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.eval()  # no dropout: old and new log-probs must come from the same function
    return model


class Critic(nn.Module):
    """V(s_t) at every position: a sequence classifier's backbone + its scalar `score` head.

    Parameters keep the classifier's names under `seq_cls.` (so the RM's weights load as is).
    """

    def __init__(self, seq_cls: nn.Module):
        super().__init__()
        self.seq_cls = seq_cls
        if not hasattr(seq_cls, "score"):
            raise ValueError(f"{type(seq_cls).__name__} has no `score` head; the critic needs a "
                             "...ForSequenceClassification model with a scalar `score` layer")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values `(B, L)`: the score head applied to the hidden state at every position.

        Args:
            input_ids: `(B, L)` int64 prompt + response tokens, right-padded.
            attention_mask: `(B, L)` 1 on real tokens.
        """
        backbone = getattr(self.seq_cls, self.seq_cls.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return self.seq_cls.score(hidden).squeeze(-1).float()  # (B, L)


def load_critic(critic_path: str, actor_path: str, dtype: str = "float32") -> Critic:
    """The critic from the reward model at `critic_path`, or from the SFT model with a zero head."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if critic_path:
        seq_cls = AutoModelForSequenceClassification.from_pretrained(critic_path, dtype=DTYPES[dtype])
        if seq_cls.config.num_labels != 1:
            raise ValueError(f"{critic_path}: a reward model has num_labels=1, got {seq_cls.config.num_labels}")
    else:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is intended here
        try:
            seq_cls = AutoModelForSequenceClassification.from_pretrained(
                actor_path, num_labels=1, dtype=DTYPES[dtype])
        finally:
            hf_logging.set_verbosity(verbosity)
        with torch.no_grad():
            for p in seq_cls.score.parameters():
                p.zero_()
    seq_cls.eval()
    return Critic(seq_cls)
