"""PPO losses for the policy and the value function, PPO-ptx, and rollout/learner mismatch helpers.

Notation: B batch, T response tokens (right-padded), L full sequence length
(prompt + response, for the pretraining LM loss), V vocabulary size.
``mask`` is ``(B, T)`` with 1 on real response tokens.

Sources:
- Clipped surrogate: Schulman et al. 2017 "Proximal Policy Optimization
  Algorithms" eq. 7; signs, clip fraction and value clipping as in
  openai/lm-human-preferences ``train_policy.py`` (from OpenAI baselines PPO2).
- PPO-ptx: Ouyang et al. 2022 eq. 2, objective
  ``E[r_phi - beta log(pi/pi_SFT)] + gamma_ptx * E_pretrain[log pi(x)]``.
- Truncated importance sampling: Yao et al. 2025, "Your Efficient RL Framework
  Secretly Brings You Off-Policy RL Training".

Reduction: every loss here is a *token mean* over all real tokens of the batch
(TRL ``masked_mean``; lm-human-preferences ``reduce_mean`` over fixed-length
rows).  Pass ``num_tokens`` (the real-token count of the whole accumulated
batch) to divide a micro-batch's sum by that instead, so that the sum of
micro-batch losses equals the full-batch loss under gradient accumulation.

Departures from InstructGPT: the pretraining term is a per-token mean cross
entropy (``lm_loss``) scaled by ``ptx_coef``, rather than a sum of log-likelihoods
over pretraining documents; ``ptx_coef`` must be tuned with that in mind.
Statistics are returned as detached 0-dim tensors (no host sync); call
``.item()`` when logging.
"""

from __future__ import annotations

import torch

from .masked import _select, masked_mean, masked_sum, masked_var


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """sum(m * x) / (num_tokens or sum(m))."""
    if num_tokens is None:
        return masked_mean(per_token, mask)
    return masked_sum(per_token, mask) / num_tokens


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    is_weights: torch.Tensor | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise).

        ratio_t = exp(log pi_theta(a_t|s_t) - log pi_old(a_t|s_t))
        loss_t  = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))
        loss    = token mean of w_t * loss_t    (w_t = ``is_weights``, default 1)

    Args:
        logprobs: ``(B, T)`` log pi_theta(a_t | s_t) under the current parameters (with grad).
        old_logprobs: ``(B, T)`` log pi_old(a_t | s_t) at rollout time (no grad).
        advantages: ``(B, T)`` A_t, usually whitened GAE advantages (no grad).
        mask: ``(B, T)`` 1.0 = real response token.
        clip_range: eps, e.g. 0.2.
        is_weights: optional ``(B, T)`` per-token importance weights for the
            rollout/learner mismatch (see :func:`tis_weights`), treated as constants.
        num_tokens: divide by this instead of the batch's real-token count (gradient accumulation).

    Returns:
        ``loss`` (scalar) and stats, each a detached scalar:
        ``approx_kl`` = token mean of k3 ``(ratio - 1) - log ratio``, an estimate
        of KL(pi_old || pi_theta) (Schulman 2020; lm-human-preferences logs
        0.5 * mean (log ratio)^2 = k2 instead);
        ``clip_fraction`` = fraction of tokens where the clipped term is the
        active one (lm-human-preferences ``pg_clipfrac``);
        ``ratio_mean`` = token mean of the ratio.
    """
    log_ratio = _select(logprobs - old_logprobs, mask)  # log pi_theta - log pi_old, 0 on padding
    ratio = torch.exp(log_ratio)  # ratio_t
    adv = _select(advantages.detach(), mask)
    unclipped = -adv * ratio  # -A_t * ratio_t
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # -A_t * clip(ratio_t, 1-eps, 1+eps)
    per_token = torch.maximum(unclipped, clipped)  # pessimistic bound
    if is_weights is not None:
        per_token = per_token * _select(is_weights.detach(), mask)  # w_t * loss_t
    loss = _token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3 = (ratio - 1) - log ratio
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (PPO2 / lm-human-preferences).

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        loss   = 0.5 * token mean of max((V - R)^2, (V_clip - R)^2)

    Args:
        values: ``(B, T)`` V_theta(s_t) under the current parameters (with grad).
        old_values: ``(B, T)`` V_old(s_t) at rollout time (no grad).
        returns: ``(B, T)`` R_t value targets from :func:`compute_gae` (no grad).
        mask: ``(B, T)`` 1.0 = real response token.
        clip_range_value: eps_v, e.g. 0.2; ``None`` disables clipping.
        num_tokens: divide by this instead of the batch's real-token count.

    Returns:
        ``loss`` (scalar) and stats: ``value_clip_fraction`` (fraction of tokens
        where the clipped error is the larger one, lm-human-preferences
        ``vf_clipfrac``), ``value_mean``, ``value_error`` (token mean of (V - R)^2).
    """
    v = _select(values, mask)  # select before squaring so padding cannot send nan into gradients
    target = _select(returns.detach(), mask)
    unclipped = (v - target) ** 2  # (V - R)^2
    if clip_range_value is None:
        clipped = unclipped
    else:
        old = _select(old_values.detach(), mask)
        v_clip = old + torch.clamp(v - old, -clip_range_value, clip_range_value)  # V_old + clip(V - V_old)
        clipped = (v_clip - target) ** 2  # (V_clip - R)^2
    loss = 0.5 * _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)  # 0.5 * max(...)
    with torch.no_grad():
        stats = {
            "value_clip_fraction": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(v, mask),
            "value_error": masked_mean(unclipped, mask),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

        H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v

    A logit of -inf (masked or top-k/top-p filtered) has p_v = 0 and adds nothing: 0 * -inf
    would be NaN, so such z_v are replaced by 0 before the product (their p_v is 0 anyway).

    Args:
        logits: ``(B, T, V)`` unnormalised scores z; -inf allowed, at least one finite per row.

    Returns:
        ``(B, T)`` entropies in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    finite = torch.where(torch.isneginf(logits), torch.zeros_like(logits), logits)  # p_v = 0 there
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(dim=-1)  # logsumexp(z) - E_p[z]


def mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token mean of :func:`entropy_from_logits` over real tokens.

    Args:
        logits: ``(B, T, V)`` policy logits at the response positions.
        mask: ``(B, T)`` 1.0 = real response token.
    """
    return masked_mean(entropy_from_logits(logits), mask)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] at each position.

    Args:
        logits: ``(B, T, V)`` logits; position t must already be the one that predicts ``tokens[:, t]``.
        tokens: ``(B, T)`` int64 token ids in ``[0, V)``.

    Returns:
        ``(B, T)`` log p(token_t).
    """
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # log p_t[token_t]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy of a causal LM (the PPO-ptx pretraining term), mean over counted tokens.

    Shift: the logits at position i predict the token at position i + 1, so
    ``logits[:, :-1]`` is scored against ``labels[:, 1:]`` (the first label and the
    last logit are never used; this matches Hugging Face ``ForCausalLMLoss``).

        loss = -1/N sum_{i: labels[i+1] != ignore} log p(labels[i+1] | x_{<=i})

    Args:
        logits: ``(B, L, V)`` LM logits over the full sequence.
        labels: ``(B, L)`` int64 token ids aligned with the *inputs* (not pre-shifted);
            ``ignore_index`` marks positions not to score (prompt, padding).
        ignore_index: label value to skip.

    Returns:
        Scalar mean cross entropy; 0 (with a zero gradient) if no label is counted.
    """
    shift_logits = logits[:, :-1, :]  # (B, L-1, V) predicts position i + 1
    shift_labels = labels[:, 1:]  # (B, L-1)
    counted = shift_labels != ignore_index
    safe_labels = torch.where(counted, shift_labels, torch.zeros_like(shift_labels))
    nll = -gather_logprobs(shift_logits, safe_labels)  # -log p(label_{i+1})
    total = _select(nll, counted).sum()
    return total / counted.sum().clamp(min=1)  # mean over counted tokens


def ppo_ptx_objective(ppo_loss: torch.Tensor, lm_loss_value: torch.Tensor, ptx_coef: float) -> torch.Tensor:
    """PPO-ptx loss: ``ppo_loss + ptx_coef * lm_loss`` (Ouyang et al. 2022 eq. 2, gamma = ``ptx_coef``).

    Maximising ``gamma * E[log pi(x_pretrain)]`` is minimising ``gamma * lm_loss``.

    Args:
        ppo_loss: scalar policy loss from :func:`policy_loss`.
        lm_loss_value: scalar pretraining cross entropy from :func:`lm_loss`.
        ptx_coef: gamma; 0 gives plain PPO.
    """
    return ppo_loss + ptx_coef * lm_loss_value  # L = L_ppo + gamma * L_lm


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over real tokens (1 is perfect, 0 is no better than a constant).

    Args:
        values: ``(B, T)`` value predictions V(s_t).
        returns: ``(B, T)`` value targets R_t.
        mask: ``(B, T)`` 1.0 = real response token.

    Returns:
        Detached scalar; ``nan`` when Var[R] is 0 (as OpenAI baselines / SB3).
    """
    with torch.no_grad():
        var_r = masked_var(returns, mask, unbiased=False)
        var_err = masked_var(returns - values, mask, unbiased=False)
        return torch.where(var_r == 0, torch.full_like(var_r, float("nan")), 1 - var_err / var_r)  # 1 - Var[R-V]/Var[R]


def tis_weights(
    learner_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Truncated importance weights for the rollout/learner mismatch (Yao et al. 2025).

    The rollout engine samples from pi_sampler (e.g. vLLM kernels, bf16) while the
    learner computes pi_old with the same weights but other kernels; the policy
    gradient needs samples from pi_old, so each token is reweighted by

        w_t = min(pi_old(a_t|s_t) / pi_sampler(a_t|s_t), C)

    Args:
        learner_logprobs: ``(B, T)`` log pi_old(a_t | s_t) recomputed by the learner.
        sampling_logprobs: ``(B, T)`` log pi_sampler(a_t | s_t) returned by the rollout engine.
        mask: ``(B, T)`` 1.0 = real response token.
        cap: C, the truncation (Yao et al. use 2).

    Returns:
        ``(B, T)`` detached weights, 0 on padding; pass as ``is_weights`` to :func:`policy_loss`.
    """
    log_w = _select((learner_logprobs - sampling_logprobs).detach(), mask)
    w = torch.clamp(torch.exp(log_w), max=cap)  # min(exp(log pi_old - log pi_sampler), C)
    return _select(w, mask)


def logprob_mismatch(
    learner_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """How far the learner's log-probs are from the sampler's on the same tokens.

    Args:
        learner_logprobs: ``(B, T)`` log pi_learner(a_t | s_t).
        sampling_logprobs: ``(B, T)`` log pi_sampler(a_t | s_t); the tokens were drawn from pi_sampler.
        mask: ``(B, T)`` 1.0 = real response token.

    Returns:
        Detached scalars: ``kl`` = token mean of k3 with r = pi_learner / pi_sampler,
        an estimate of KL(pi_sampler || pi_learner); ``max_abs_diff`` = max |difference|
        of log-probs over real tokens; ``mean_abs_diff``.
    """
    with torch.no_grad():
        log_r = _select(learner_logprobs - sampling_logprobs, mask)  # log r = log pi_learner - log pi_sampler
        abs_diff = log_r.abs()
        return {
            "kl": masked_mean(torch.expm1(log_r) - log_r, mask),  # k3 = (r - 1) - log r
            "max_abs_diff": abs_diff.max() if abs_diff.numel() else abs_diff.new_zeros(()),
            "mean_abs_diff": masked_mean(abs_diff, mask),
        }
