"""Per-token KL penalty to the SFT (reference) policy and the KL coefficient controllers.

Notation: B batch, T response tokens (right-padded), ``mask`` ``(B, T)`` with 1 on
real tokens.  ``logprobs`` are ``log pi(a_t | s_t)`` of the policy that sampled
the tokens; ``ref_logprobs`` are ``log pi_SFT(a_t | s_t)`` of the frozen reference.

Reward shaping (Ziegler et al. 2019 "Fine-Tuning Language Models from Human
Preferences", openai/lm-human-preferences ``train_policy.py``; Ouyang et al.
2022 eq. 2; Stiennon et al. 2020):

    R(x, y) = r_phi(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))

spread over tokens as ``-beta * KL_t`` on every token plus the reward-model
score on the last real token, as lm-human-preferences and TRL's PPO trainer do.

KL estimators from J. Schulman, "Approximating KL Divergence" (2020), with
samples a_t ~ p = pi and ``r = q / p = exp(ref_logprobs - logprobs)``:

    k1 = log p - log q            unbiased, can be negative
    k2 = 0.5 * (log p - log q)^2  biased, non-negative, low variance
    k3 = (r - 1) - log r          unbiased, non-negative, low variance

Departures from InstructGPT: none for the reward itself (k1 is the default, as
in the paper).  Zero-length responses have no token to carry the score and are
rejected with ``ValueError`` (the rollout service must emit at least one token,
e.g. EOS).
"""

from __future__ import annotations

import torch

from .masked import _select, check_right_padded

KL_KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k1",
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi.

    Args:
        logprobs: ``(B, T)`` log pi(a_t | s_t) of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` log pi_ref(a_t | s_t) of the same tokens under the reference.
        mask: ``(B, T)`` 1.0 = real response token.
        kind: ``"k1"``, ``"k2"`` or ``"k3"`` (Schulman 2020, see module docstring).

    Returns:
        ``(B, T)`` per-token KL estimate, exactly 0 on padding.
    """
    log_ratio = _select(logprobs - ref_logprobs, mask)  # log p - log q (0 on padding)
    if kind == "k1":
        kl = log_ratio  # k1 = log p - log q
    elif kind == "k2":
        kl = 0.5 * log_ratio**2  # k2 = 0.5 * (log p - log q)^2
    elif kind == "k3":
        log_r = -log_ratio  # log r = log q - log p
        kl = torch.expm1(log_r) - log_r  # k3 = (r - 1) - log r
    else:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    return _select(kl, mask)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded mask.

    Args:
        mask: ``(B, T)`` 1.0 = real response token, right-padded, no empty row.

    Returns:
        ``(B,)`` int64 index ``len_b - 1``.
    """
    check_right_padded(mask, allow_empty=False)
    return mask.bool().sum(dim=1) - 1  # len_b - 1


def kl_shaped_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: KL penalty on every token, reward-model score on the last.

        rewards_t = -kl_coef * KL_t + [t == len_b - 1] * score_b

    (lm-human-preferences ``train_policy.py``: ``rewards = -kl_coef * kl;
    rewards[:, -1] += scores``, with the score put on the last *real* token
    of each row as TRL does for variable lengths.)

    Args:
        score: ``(B,)`` reward-model score r_phi(x, y) of each full response.
        logprobs: ``(B, T)`` log pi(a_t | s_t) of the sampling policy.
        ref_logprobs: ``(B, T)`` log pi_SFT(a_t | s_t) of the reference policy.
        mask: ``(B, T)`` 1.0 = real response token; right-padded.
        kl_coef: beta, the KL coefficient (see :class:`AdaptiveKLController`).
        kind: KL estimator, ``"k1"`` (InstructGPT) by default.

    Returns:
        ``rewards`` ``(B, T)`` and the per-token ``kl`` ``(B, T)``; both 0 on padding.

    Raises:
        ValueError: a row has no real token, or the mask is not right-padded.
    """
    if score.dim() != 1 or score.shape[0] != mask.shape[0]:
        raise ValueError(f"score must be (B,) = ({mask.shape[0]},), got {tuple(score.shape)}")
    last = last_token_index(mask)  # (B,)
    kl = kl_estimate(logprobs, ref_logprobs, mask, kind)  # (B, T)
    rewards = -kl_coef * kl  # -beta * KL_t on every real token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards = rewards.index_put((rows, last), score.to(rewards.dtype), accumulate=True)  # + r_phi at t = len - 1
    return rewards, kl


class FixedKLController:
    """Constant KL coefficient beta (InstructGPT uses a fixed beta = 0.02)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; kept so both controllers share one interface."""

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["kl_coef"])


class AdaptiveKLController:
    """Adaptive beta from Ziegler et al. 2019 (sec. 2.2), as in lm-human-preferences ``AdaptiveKLController``.

        e_t  = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta <- beta * (1 + K_beta * e_t),  K_beta = n_steps / horizon

    Args:
        init_kl_coef: starting beta.
        target: KL_target, the per-sequence KL (nats) to steer towards.
        horizon: number of samples over which beta may change by ~e (lm-human-preferences: 10000).

    Note:
        ``load_state_dict`` restores only the coefficient; ``target`` and
        ``horizon`` come from the constructor (the run's config).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the target.

        Args:
            current_kl: mean per-sequence KL(pi || pi_SFT) of the last batch (nats).
            n_steps: samples seen since the last update (lm-human-preferences passes the batch size).
        """
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # clip(KL/target - 1, +-0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon  # 1 + e * n / horizon
        self.value *= mult  # beta <- beta * mult

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["kl_coef"])
