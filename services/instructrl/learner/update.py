"""The PPO update of one batch on the actor and critic engines: steps 2-4 of
`instructrl.learner.loop` (no I/O, no control flow; the math itself is `instructrl.rl`).

Gradient accumulation and data parallelism: DeepSpeed divides each micro-batch loss by G
and averages gradients over the W ranks, i.e. scales the summed micro-batch gradients by
1 / (G * W). `loss_divisor` undoes that for a token-mean loss: a micro-batch loss
`sum_tokens / (N_minibatch / (G * W))` makes the applied gradient that of
`sum over the minibatch / N_minibatch`, whatever W and G are.

Notation: B batch, T response tokens, W ranks, G gradient-accumulation steps.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from instructrl.learner.batch import ExperienceBatch
from instructrl.learner.config import PPOConfig
from instructrl.learner.models import lm_forward, policy_forward, value_forward
from instructrl.learner.ptx import PtxData
from instructrl.rl import (
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    kl_shaped_rewards,
    lm_loss,
    logprob_mismatch,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    ppo_ptx_objective,
    tis_weights,
    value_loss,
)


@dataclasses.dataclass
class OldPolicy:
    """Step 2: the batch under the weights this iteration starts from (whole batch, every rank)."""

    logprobs: torch.Tensor  # (B, T) log pi_old(a_t | s_t)
    values: torch.Tensor  # (B, T) V_old(s_t)
    entropy: torch.Tensor  # (B, T) entropy of pi_old(. | s_t)
    is_weights: torch.Tensor | None  # (B, T) min(pi_old / pi_sampler, tis_cap); None when ppo.tis_cap = 0
    mismatch: dict[str, torch.Tensor]  # `logprob_mismatch` vs the sampler: kl, max_abs_diff


@dataclasses.dataclass
class Advantages:
    """Step 3: shaped rewards, GAE advantages and returns."""

    rewards: torch.Tensor  # (B, T) -kl_coef * KL_t, + score on the last real token
    advantages: torch.Tensor  # (B, T) GAE, whitened over the batch if ppo.whiten_advantages
    returns: torch.Tensor  # (B, T) GAE + V_old, the value target
    kl_per_seq: torch.Tensor  # (B,) sum_t k1 KL(actor || SFT)
    mean: float  # of the advantages before whitening
    std: float


@dataclasses.dataclass
class PPOStats:
    """Step 4's statistics, summed over epochs and micro-batches (and ranks after `all_reduce`)."""

    policy_loss: float = 0.0  # sum of micro-batch losses x divisor (= token sums)
    value_loss: float = 0.0
    approx_kl: float = 0.0  # token sums
    clip_fraction: float = 0.0
    tokens: float = 0.0  # response tokens, once per epoch
    ptx_loss: float = 0.0  # sum of micro-batch LM losses
    ptx_batches: float = 0.0

    def all_reduce(self, device: torch.device) -> PPOStats:
        """The sums over all ranks (a collective; identity on one rank)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        sums = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        return PPOStats(*sums.cpu().tolist())

    def means(self) -> dict[str, float | None]:
        """Token means of the losses and statistics; the ptx loss per micro-batch (None without ptx)."""
        return {"approx_kl": self.approx_kl / self.tokens, "clip_fraction": self.clip_fraction / self.tokens,
                "policy_loss": self.policy_loss / self.tokens, "value_loss": self.value_loss / self.tokens,
                "ptx_loss": self.ptx_loss / self.ptx_batches if self.ptx_batches else None}


def loss_divisor(minibatch_tokens: int, world: int, gas: int) -> float:
    """`num_tokens` to pass to the RL losses of one micro-batch (see the module docstring)."""
    return minibatch_tokens / (world * gas)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0 in rank order (identity on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def old_logprobs_and_values(actor, critic, batch: ExperienceBatch, ppo: PPOConfig,
                            rank: int, world: int) -> OldPolicy:
    """2. Forward this rank's shard (`B / W` records, in micro-batches), then all-gather."""
    B, mask = len(batch), batch.response_mask
    shard = batch.rows(slice(rank * B // world, (rank + 1) * B // world))
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "entropy": []}
    for i in range(0, len(shard), ppo.micro_batch_size):
        micro = shard.rows(slice(i, i + ppo.micro_batch_size))
        logprobs, logits = policy_forward(actor, micro)
        parts["logprobs"].append(logprobs)
        parts["entropy"].append(entropy_from_logits(logits))
        parts["values"].append(value_forward(critic, micro))
    logprobs, values, entropy = (all_gather_rows(torch.cat(parts[k])) for k in ("logprobs", "values", "entropy"))
    is_weights = (tis_weights(logprobs, batch.sampling_logprobs, mask, ppo.tis_cap)
                  if ppo.tis_cap > 0 else None)  # w_t = min(pi_old / pi_sampler, C)
    return OldPolicy(logprobs, values, entropy, is_weights,
                     logprob_mismatch(logprobs, batch.sampling_logprobs, mask))


def shaped_rewards_and_advantages(batch: ExperienceBatch, old: OldPolicy, kl_coef: float,
                                  ppo: PPOConfig) -> Advantages:
    """3. rewards = score at the last token - kl_coef * KL_t; GAE; whitening."""
    mask = batch.response_mask
    rewards, _ = kl_shaped_rewards(batch.scores, old.logprobs, batch.ref_logprobs, mask, kl_coef, ppo.kl_kind)
    advantages, returns = compute_gae(rewards, old.values, mask, ppo.gamma, ppo.lam)  # (B, T)
    mean, std = masked_mean(advantages, mask), masked_var(advantages, mask, unbiased=False).sqrt()
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    kl_per_seq = masked_sum(kl_estimate(old.logprobs, batch.ref_logprobs, mask, "k1"), mask, dim=1)  # (B,)
    return Advantages(rewards, advantages, returns, kl_per_seq, float(mean), float(std))


def ppo_epochs(actor, critic, batch: ExperienceBatch, old: OldPolicy, adv: Advantages, ptx: PtxData | None,
               ppo: PPOConfig, *, policy_version: int, rank: int, world: int, gas: int,
               device: torch.device) -> PPOStats:
    """4. `ppo.epochs` passes in a seeded order (seed, policy_version); one optimizer step per minibatch."""
    B, mask = len(batch), batch.response_mask
    stats = PPOStats()
    shuffle = torch.Generator().manual_seed(ppo.seed * 1_000_003 + policy_version)
    for _epoch in range(ppo.epochs):
        order = torch.randperm(B, generator=shuffle)
        for start in range(0, B, ppo.minibatch_size):
            minibatch = order[start:start + ppo.minibatch_size]
            divisor = loss_divisor(int(mask[minibatch].sum()), world, gas)  # N_minibatch / (W * G)
            for idx in minibatch.view(world, gas, ppo.micro_batch_size)[rank]:  # this rank's micro-batches
                _micro_batch(actor, critic, batch.rows(idx), old, adv, idx, ptx, ppo, divisor, stats)
    return stats.all_reduce(device)


def _micro_batch(actor, critic, micro: ExperienceBatch, old: OldPolicy, adv: Advantages, idx: torch.Tensor,
                 ptx: PtxData | None, ppo: PPOConfig, divisor: float, stats: PPOStats) -> None:
    """Backward of one micro-batch (rows `idx` of the batch) through both engines; adds to `stats`."""
    mask = micro.response_mask
    logprobs, _ = policy_forward(actor, micro)
    pg_loss, pg_stats = policy_loss(logprobs, old.logprobs[idx], adv.advantages[idx], mask, ppo.clip_range,
                                    old.is_weights[idx] if old.is_weights is not None else None,
                                    num_tokens=divisor)
    loss = pg_loss
    if ptx is not None:  # PPO-ptx: + gamma * LM loss on pretraining text
        ptx_ids, ptx_mask, ptx_labels = ptx.next_batch()
        ptx_loss = lm_loss(lm_forward(actor, ptx_ids, ptx_mask), ptx_labels)
        loss = ppo_ptx_objective(pg_loss, ptx_loss, ppo.ptx_coef)
        stats.ptx_loss += ptx_loss.item()
        stats.ptx_batches += 1
    actor.backward(loss)
    values = value_forward(critic, micro)
    vf_loss, _ = value_loss(values, old.values[idx], adv.returns[idx], mask, ppo.clip_range_value or None,
                            num_tokens=divisor)
    critic.backward(vf_loss)
    actor.step()  # DeepSpeed steps the optimizer (with clipping) at the G-th micro-batch only
    critic.step()
    n = float(mask.sum())
    stats.policy_loss += pg_loss.item() * divisor
    stats.value_loss += vf_loss.item() * divisor
    stats.approx_kl += pg_stats["approx_kl"].item() * n
    stats.clip_fraction += pg_stats["clip_fraction"].item() * n
    stats.tokens += n


def iteration_stats(batch: ExperienceBatch, old: OldPolicy, adv: Advantages, ppo: PPOStats) -> dict[str, float | None]:
    """The iteration's statistics of steps 2-4 under their JSONL / Prometheus keys (docs/learner.md)."""
    mask = batch.response_mask
    return {
        "reward_mean": float(masked_sum(adv.rewards, mask, dim=1).mean()),
        "score_mean": float(batch.scores.mean()),
        "kl_to_ref": float(adv.kl_per_seq.mean()),
        "entropy": float(masked_mean(old.entropy, mask)),
        **ppo.means(),
        "explained_variance": float(explained_variance(old.values, adv.returns, mask)),
        "response_length_mean": float(mask.sum(1).mean()),
        "advantage_mean": adv.mean, "advantage_std": adv.std,
        "logprob_mismatch_kl": float(old.mismatch["kl"]),
        "logprob_mismatch_max_abs": float(old.mismatch["max_abs_diff"]),
        "policy_lag_mean": float(batch.lags.float().mean()),
    }
