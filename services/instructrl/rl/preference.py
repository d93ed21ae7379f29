"""Preference losses: reward-model training (pairwise and K-wise) and DPO.

Notation: B batch (prompts, or comparison pairs), T response tokens
(right-padded), K responses per prompt (padded to the batch's largest K).

Sources:
- Bradley-Terry pairwise loss: ``-log sigmoid(r_chosen - r_rejected)``
  (Stiennon et al. 2020; Ouyang et al. 2022 eq. 1).
- K-wise ranking loss, Ouyang et al. 2022 eq. 1:

      loss(theta) = -1/C(K,2) E_{(x, y_w, y_l) ~ D}[log sigmoid(r(x, y_w) - r(x, y_l))]

  with all C(K,2) comparisons of one prompt kept in one batch element (one
  forward pass per response, no overfitting from reusing responses across
  batch elements).
- DPO: Rafailov et al. 2023 eq. 7, with the conservative label smoothing of
  TRL's ``DPOTrainer`` ``loss_type="sigmoid"``.

Numerics: every log sigmoid is ``F.logsigmoid`` (stable for large margins).

Departures from InstructGPT: the per-prompt pair mean uses that prompt's own
C(K_b, 2) (K varies from 4 to 9 in the paper's data), then prompts are averaged
with equal weight.  Accuracy counts ties (r_i == r_j) as wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masked import masked_sum


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise reward-model loss.

    Args:
        chosen_rewards: ``(B,)`` r(x, y_w), scalar reward of the preferred response.
        rejected_rewards: ``(B,)`` r(x, y_l), reward of the other response.

    Returns:
        ``loss`` = mean_b -log sigmoid(r_w - r_l) and ``accuracy`` = mean_b [r_w > r_l] (detached).
    """
    margin = chosen_rewards - rejected_rewards  # r_w - r_l
    loss = -F.logsigmoid(margin).mean()  # -E[log sigmoid(r_w - r_l)]
    accuracy = (margin.detach() > 0).to(margin.dtype).mean()
    return loss, accuracy


def kwise_ranking_loss(
    rewards: torch.Tensor,
    num_responses: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT K-wise ranking loss over every pair of each prompt's ranked responses.

    For prompt b with K_b responses ranked best first, pairs (i, j) with
    i < j < K_b have response i preferred:

        loss_b = 1/C(K_b,2) sum_{i<j<K_b} -log sigmoid(r_{b,i} - r_{b,j})
        loss   = mean_b loss_b

    Args:
        rewards: ``(B, K)`` r(x_b, y_{b,k}), responses sorted best first;
            columns ``k >= num_responses[b]`` are padding and may hold anything.
        num_responses: ``(B,)`` int K_b in ``[2, K]``, real responses of prompt b.

    Returns:
        ``loss`` (scalar) and ``accuracy`` = correctly ordered pairs / all real
        pairs of the batch (each pair counts once; detached).

    Raises:
        ValueError: some K_b is below 2 or above K.
    """
    B, K = rewards.shape
    n = num_responses.to(device=rewards.device, dtype=torch.long)
    if n.shape != (B,):
        raise ValueError(f"num_responses must be (B,) = ({B},), got {tuple(n.shape)}")
    if bool(((n < 2) | (n > K)).any()):
        raise ValueError(f"num_responses must lie in [2, K={K}], got {n.tolist()}")
    idx = torch.arange(K, device=rewards.device)
    better = idx[:, None] < idx[None, :]  # (K, K): i ranked above j
    real = idx[None, :] < n[:, None]  # (B, K): response k is real
    pair_mask = better[None] & real[:, :, None] & real[:, None, :]  # (B, K, K): real pair, i above j
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    diff = torch.where(pair_mask, diff, torch.zeros_like(diff))  # keep padding out of values and grads
    pair_nll = -F.logsigmoid(diff)  # -log sigmoid(r_i - r_j)
    num_pairs = (n * (n - 1) // 2).to(rewards.dtype)  # C(K_b, 2)
    per_prompt = masked_sum(pair_nll, pair_mask, dim=(1, 2)) / num_pairs  # 1/C(K_b,2) sum over pairs
    loss = per_prompt.mean()  # mean over prompts
    with torch.no_grad():
        correct = pair_mask & (diff > 0)
        accuracy = correct.sum().to(rewards.dtype) / pair_mask.sum().to(rewards.dtype)
    return loss, accuracy


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(a_t | s_t) over real tokens.

    Args:
        logprobs: ``(B, T)`` per-token log-probabilities of the response tokens.
        mask: ``(B, T)`` 1.0 = real response token.

    Returns:
        ``(B,)`` per-response log-likelihood.
    """
    return masked_sum(logprobs, mask, dim=-1)  # sum_t m_t log pi(a_t|s_t)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation, sigmoid loss (Rafailov et al. 2023 eq. 7; TRL ``sigmoid``).

        h    = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
        loss = mean[ -(1 - s) log sigmoid(beta h) - s log sigmoid(-beta h) ]

    where s = ``label_smoothing``, the assumed probability that a label is
    flipped (conservative DPO); s = 0 is plain DPO.

    Args:
        policy_chosen_logps: ``(B,)`` log pi_theta(y_w | x), summed over tokens (:func:`sequence_logprobs`).
        policy_rejected_logps: ``(B,)`` log pi_theta(y_l | x).
        ref_chosen_logps: ``(B,)`` log pi_ref(y_w | x).
        ref_rejected_logps: ``(B,)`` log pi_ref(y_l | x).
        beta: inverse temperature of the implicit reward (TRL default 0.1).
        label_smoothing: s in [0, 0.5).

    Returns:
        ``loss`` (scalar); ``chosen_rewards`` ``(B,)`` = beta (log pi(y_w) - log pi_ref(y_w))
        and ``rejected_rewards`` ``(B,)`` likewise (implicit rewards, detached);
        ``accuracy`` = mean [chosen_reward > rejected_reward] (detached).
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # log pi(y_w)/pi_ref(y_w)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # log pi(y_l)/pi_ref(y_l)
    h = chosen_logratio - rejected_logratio
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * chosen_logratio.detach()  # implicit reward beta log pi/pi_ref
    rejected_rewards = beta * rejected_logratio.detach()
    accuracy = (chosen_rewards > rejected_rewards).to(h.dtype).mean()
    return losses.mean(), chosen_rewards, rejected_rewards, accuracy
