"""Generalised Advantage Estimation over right-padded response batches.

Notation: B batch, T response tokens (right-padded), ``mask`` ``(B, T)`` with 1 on
real tokens.  Token t is the action a_t; the episode is one response and ends
after its last real token, whose next-state value is 0 (no bootstrap).

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eq. 16), per row with m_t the mask:

    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    R_t     = A_t + V_t          (value targets, "returns")

Same recursion as openai/lm-human-preferences ``train_policy.py`` and TRL's PPO
trainer; instead of relying on zeroed padding, the mask of the *next* token cuts
the recursion, so values/rewards on padding can hold anything.

Departures from InstructGPT: none (InstructGPT uses gamma = 1, lam = 0.95 via
the lm-human-preferences defaults).  Advantage whitening is left to the caller
(``masked_whiten``), as in lm-human-preferences.
"""

from __future__ import annotations

import torch

from .masked import _select, check_right_padded


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, vectorised over the batch, reverse loop over T.

    Args:
        rewards: ``(B, T)`` per-token rewards r_t (e.g. from ``kl_shaped_rewards``).
        values: ``(B, T)`` value estimates V(s_t) under the rollout's value function.
        mask: ``(B, T)`` 1.0 = real response token; must be right-padded.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``advantages`` ``(B, T)`` A_t and ``returns`` ``(B, T)`` R_t = A_t + V_t;
        both exactly 0 on padding.  No gradient flows from either (computed on
        detached inputs, as a rollout-time quantity).
    """
    check_right_padded(mask)
    m = mask.bool()
    r = _select(rewards.detach(), m)
    v = _select(values.detach(), m)
    mf = m.to(v.dtype)
    B, T = r.shape
    advantages = torch.zeros_like(v)
    next_advantage = torch.zeros(B, dtype=v.dtype, device=v.device)  # A_{t+1}
    next_value = torch.zeros(B, dtype=v.dtype, device=v.device)  # V_{t+1}
    next_mask = torch.zeros(B, dtype=v.dtype, device=v.device)  # m_{t+1}; 0 past the end
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_mask * next_value - v[:, t]  # delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t
        next_advantage = delta + gamma * lam * next_mask * next_advantage  # A_t = delta_t + gamma lam m_{t+1} A_{t+1}
        advantages[:, t] = next_advantage
        next_value, next_mask = v[:, t], mf[:, t]
    advantages = _select(advantages, m)
    returns = _select(advantages + v, m)  # R_t = A_t + V_t
    return advantages, returns
