"""The actor (policy) and the critic (value function): torch modules, DeepSpeed engines, forward passes.

- Actor: `AutoModelForCausalLM` from the SFT directory.
- Critic: initialised from the reward model, as InstructGPT did (Ouyang et al. 2022,
  sec. 3.5: "we initialize the value function from the RM"). Our RM stage saves a
  `...ForSequenceClassification` with `num_labels=1`; its forward pools the score at
  the last token only, so the critic calls the classifier's backbone and its `score`
  head itself, at *every* position, giving V(s) for each prefix: values `(B, L)`
  (`models/reward_head.py`: the same module `instructrl rm` trains, so the value at the
  last real token is the RM's reward).
  Without an RM (tests, ablations) the critic starts from the SFT directory with a
  fresh scalar head initialised to zero (values start at 0).

Each is wrapped in a DeepSpeed engine (`instructrl.deepspeed_setup`) with a torch AdamW;
gradient accumulation G = `ppo.minibatch_size / (micro_batch_size * W)`.

Notation: B batch, L full sequence length (prompt + response, right-padded), T response
length, V vocabulary, W ranks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from instructrl.deepspeed_setup import build_engine, ds_config
from instructrl.learner.batch import ExperienceBatch
from instructrl.learner.config import LearnerConfig
from instructrl.models.reward_head import ScalarHeadModel
from instructrl.rl import gather_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_actor(path: str, dtype: str = "float32") -> nn.Module:
    """The policy: a Hugging Face causal LM from `path`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.eval()  # no dropout: old and new log-probs must come from the same function
    return model


# V(s_t) at every position: the classifier's backbone + its scalar `score` head, read through
# the module that fixes the reward position for RM training and the reward service too.
Critic = ScalarHeadModel


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


# --- DeepSpeed engines ---------------------------------------------------------------

def grad_accum_steps(cfg: LearnerConfig, world: int) -> int:
    """G such that world * G * micro_batch_size == minibatch_size."""
    ppo = cfg.ppo
    per_step = ppo.micro_batch_size * world
    if ppo.minibatch_size % per_step or ppo.batch_size % world:
        raise ValueError(f"ppo.minibatch_size {ppo.minibatch_size} must be a multiple of micro_batch_size "
                         f"{ppo.micro_batch_size} x {world} ranks, and batch_size of the rank count")
    return ppo.minibatch_size // per_step


def _engine(model: nn.Module, lr: float, cfg: LearnerConfig, world: int):
    """`model` in a DeepSpeed engine with a torch AdamW (no schedule)."""
    ppo = cfg.ppo
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=ppo.weight_decay, eps=ppo.adam_eps)
    config = ds_config(micro_batch_size=ppo.micro_batch_size, grad_accum_steps=grad_accum_steps(cfg, world),
                       grad_clip=ppo.max_grad_norm, zero_stage=cfg.deepspeed.zero_stage,
                       bf16=cfg.model.dtype == "bfloat16")
    return build_engine(model, optimizer, config)


def actor_and_critic(cfg: LearnerConfig, world: int):
    """The actor and critic engines of `cfg.model`, with `ppo.actor_lr` and `ppo.critic_lr`."""
    m = cfg.model
    actor = _engine(load_actor(m.actor_path, m.dtype), cfg.ppo.actor_lr, cfg, world)
    critic = _engine(load_critic(m.critic_path, m.actor_path, m.dtype), cfg.ppo.critic_lr, cfg, world)
    return actor, critic


# --- forward passes ------------------------------------------------------------------

def policy_forward(actor, batch: ExperienceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and logits of the response tokens under the actor, at each record's sampling
    temperature tau_b (`batch.temperatures`, carried by the record: the sampler's and the
    reference's, so all three log-probs are of the same distribution).

    Returns:
        logprobs `(B, T)` log pi(a_t | s_t), and the response logits `(B, T, V)` (float32,
        divided by tau_b).
    """
    device = next(actor.parameters()).device
    logits = actor(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    index = batch.positions.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T, V)
    tau = batch.temperatures.to(device)[:, None, None]  # (B, 1, 1)
    resp_logits = logits.gather(1, index).float() / tau  # logits[P_b + t - 1] predict a_t
    return gather_logprobs(resp_logits, batch.response_ids.to(device)), resp_logits


def value_forward(critic, batch: ExperienceBatch) -> torch.Tensor:
    """V(s_t) of each response token's state `(B, T)` (read at the position that predicts a_t)."""
    device = next(critic.parameters()).device
    values = critic(batch.input_ids.to(device), batch.attention_mask.to(device))  # (B, L)
    return values.gather(1, batch.positions.to(device))  # (B, T)


def lm_forward(actor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits `(B, L, V)` (the PPO-ptx pretraining term)."""
    device = next(actor.parameters()).device
    return actor(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()


def hf_named_parameters(engine, rank: int) -> list[tuple[str, torch.Tensor]]:
    """The actor's full parameters as `(HF state_dict name, CPU tensor)`; a collective.

    Under ZeRO-3 every rank must call it (each parameter is gathered from its shards);
    only rank 0 gets the list, the others an empty one. Names are those of the Hugging
    Face model (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
    """
    module = engine.module
    out: list[tuple[str, torch.Tensor]] = []
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out.append((name, p.detach().to("cpu", copy=True)))
        return out
    if rank == 0:
        out = [(name, p.detach().to("cpu")) for name, p in module.named_parameters()]
    return out


def checkpoint_named_parameters(model: Any,
                                named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """`named` (the HF model's parameter names) renamed to the names of its saved checkpoint.

    vLLM's weight loaders take checkpoint names, and transformers (v5) renames some weights
    on load, e.g. GPT-NeoX's checkpoint `embed_out.weight` is the model's `lm_head.weight`;
    transformers' own `save_pretrained` reverts that mapping, and so does this. The tensors
    are unchanged (vLLM's loaders do the per-architecture layout work, e.g. transposing
    GPT-2's Conv1D weights). Tied weights appear once, under the embedding's name.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 renames nothing
        return named
    renamed = revert_weight_conversion(model, dict(named))
    return list(renamed.items())
