"""Pure RL math for instructrl: imports only torch and the standard library.

Notation used throughout: B batch, T response tokens (right-padded), K responses
per prompt, V vocabulary, L full sequence length; ``mask`` ``(B, T)`` is 1 on real
response tokens.  See each module's docstring for sources and departures from
InstructGPT (Ouyang et al. 2022).

- ``masked``: masked sum/mean/var/whiten.
- ``kl``: k1/k2/k3 KL estimators, KL-shaped rewards, fixed/adaptive KL controllers.
- ``advantages``: GAE.
- ``ppo``: clipped policy and value losses, entropy, LM (ptx) loss, TIS weights.
- ``preference``: Bradley-Terry, K-wise ranking and DPO losses.
"""

from .advantages import compute_gae
from .kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_shaped_rewards,
    last_token_index,
)
from .masked import check_right_padded, masked_mean, masked_sum, masked_var, masked_whiten
from .ppo import (
    entropy_from_logits,
    explained_variance,
    gather_logprobs,
    lm_loss,
    logprob_mismatch,
    mean_entropy,
    policy_loss,
    ppo_ptx_objective,
    tis_weights,
    value_loss,
)
from .preference import bradley_terry_loss, dpo_loss, kwise_ranking_loss, sequence_logprobs

__all__ = [
    "KL_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "check_right_padded",
    "compute_gae",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gather_logprobs",
    "kl_estimate",
    "kl_shaped_rewards",
    "kwise_ranking_loss",
    "last_token_index",
    "lm_loss",
    "logprob_mismatch",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_entropy",
    "policy_loss",
    "ppo_ptx_objective",
    "sequence_logprobs",
    "tis_weights",
    "value_loss",
]
