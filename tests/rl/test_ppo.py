"""PPO policy/value losses, entropy, PPO-ptx LM loss, explained variance, TIS weights."""

import math

import pytest
import torch
import torch.nn.functional as F

from instructrl.rl import (
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

RATIOS = torch.tensor([0.5, 1.0, 1.5])


def _logprobs_with_ratios(ratios):
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    new = (old + torch.log(ratios)[None]).requires_grad_(True)
    return new, old


def test_policy_loss_clipped_ratios_positive_advantage():
    # clip_range 0.2 -> clip(ratio) in [0.8, 1.2]; A = +1 on every token
    #   ratio 0.5: unclipped -0.5, clipped -0.8 -> max = -0.5 (unclipped active)
    #   ratio 1.0: -1.0 both                    -> -1.0
    #   ratio 1.5: unclipped -1.5, clipped -1.2 -> max = -1.2 (clipped active)
    # loss = (-0.5 - 1.0 - 1.2) / 3 = -0.9, clip fraction 1/3
    new, old = _logprobs_with_ratios(RATIOS)
    mask = torch.ones(1, 3)
    loss, stats = policy_loss(new, old, torch.ones(1, 3), mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.9)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    # approx_kl = mean k3 = mean((r - 1) - log r) = (0.193147 + 0 + 0.094535) / 3 = 0.095894
    assert stats["approx_kl"].item() == pytest.approx(0.095894, abs=1e-6)
    # d loss / d logp_t = -A * ratio / 3 where unclipped is active, 0 where clipped
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5 / 3, -1.0 / 3, 0.0]]))


def test_policy_loss_clipped_ratios_negative_advantage():
    # A = -1: ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped), 1.0 -> 1.0, 1.5 -> max(1.5, 1.2) = 1.5
    # loss = (0.8 + 1.0 + 1.5) / 3 = 1.1, clip fraction 1/3
    new, old = _logprobs_with_ratios(RATIOS)
    loss, stats = policy_loss(new, old, -torch.ones(1, 3), torch.ones(1, 3), clip_range=0.2)
    assert loss.item() == pytest.approx(1.1)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, 1.0 / 3, 1.5 / 3]]))


def test_policy_loss_padding_invariance_and_nan_padding():
    torch.manual_seed(0)
    B, T = 4, 7
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]).float()
    new, old, adv = -torch.rand(B, T), -torch.rand(B, T), torch.randn(B, T)
    loss, stats = policy_loss(new, old, adv, mask, 0.2)
    nan = torch.full((B, 3), torch.nan)
    new_p = torch.cat([new, nan], 1).requires_grad_(True)
    mask_p = torch.cat([mask, torch.zeros(B, 3)], 1)
    weights_p = torch.cat([torch.ones(B, T), nan], 1)
    old_p, adv_p = torch.cat([old, nan], 1), torch.cat([adv, nan], 1)
    loss_p, stats_p = policy_loss(new_p, old_p, adv_p, mask_p, 0.2, is_weights=weights_p)
    torch.testing.assert_close(loss_p, loss)
    for k in stats:
        torch.testing.assert_close(stats_p[k], stats[k])
    loss_p.backward()
    assert torch.isfinite(new_p.grad).all() and (new_p.grad[mask_p == 0] == 0).all()


def test_value_loss_padding_invariance_and_nan_padding():
    torch.manual_seed(4)
    B, T = 4, 6
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]).float()
    values, old, returns = torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    loss, stats = value_loss(values, old, returns, mask, 0.2)
    nan = torch.full((B, 2), torch.nan)
    values_p = torch.cat([values, nan], 1).requires_grad_(True)
    old_p, returns_p = torch.cat([old, nan], 1), torch.cat([returns, nan], 1)
    loss_p, stats_p = value_loss(values_p, old_p, returns_p, torch.cat([mask, torch.zeros(B, 2)], 1), 0.2)
    torch.testing.assert_close(loss_p, loss)
    for k in stats:
        torch.testing.assert_close(stats_p[k], stats[k])
    loss_p.backward()
    assert torch.isfinite(values_p.grad).all() and (values_p.grad[:, T:] == 0).all()


def test_micro_batches_with_num_tokens_equal_full_batch():
    # gradient accumulation invariant: sum over micro-batches of (token sum / total tokens) == full batch token mean
    torch.manual_seed(1)
    B, T = 8, 5
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]).float()
    old, adv = -torch.rand(B, T), torch.randn(B, T)
    new = (old + 0.3 * torch.randn(B, T)).requires_grad_(True)
    full, _ = policy_loss(new, old, adv, mask, 0.2)
    full_grad = torch.autograd.grad(full, new)[0]
    n = mask.sum().item()
    accumulated = sum(
        policy_loss(new[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], 0.2, num_tokens=n)[0]
        for i in range(B)
    )
    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(torch.autograd.grad(accumulated, new)[0], full_grad)


def test_tis_weights_and_weighted_policy_loss():
    # learner - sampler log-probs: log 3 -> 3 capped at 2; log 0.5 -> 0.5; 0 -> 1; padding -> 0
    learner = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, 9.0]])
    sampler = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = tis_weights(learner, sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0, 0.0]]))
    # with ratio 1 everywhere the per-token loss is -A; weighted: -(2*1 + 0.5*2 + 1*3) / 3 = -2
    logp = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    loss, _ = policy_loss(logp, logp, adv, mask, 0.2, is_weights=w)
    assert loss.item() == pytest.approx(-2.0)


def test_logprob_mismatch_hand_worked():
    learner = torch.tensor([[-1.0, -2.0, 0.0]])
    sampler = torch.tensor([[-1.0, -2.5, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    stats = logprob_mismatch(learner, sampler, mask)
    # log r = [0, 0.5]; k3 = [0, e^0.5 - 1 - 0.5 = 0.148721] -> mean 0.074361
    assert stats["kl"].item() == pytest.approx(0.0743606, abs=1e-6)
    assert stats["max_abs_diff"].item() == pytest.approx(0.5)
    assert stats["mean_abs_diff"].item() == pytest.approx(0.25)


def test_value_loss_hand_worked():
    # old V = 1.0, clip 0.2 -> V_clip in [0.8, 1.2]
    #   V=1.5, R=2: unclipped 0.25, V_clip 1.2 -> 0.64; max 0.64 (clipped larger)
    #   V=0.9, R=2: unclipped 1.21, V_clip 0.9 -> 1.21; max 1.21
    #   V=3.0, R=2: unclipped 1.00, V_clip 1.2 -> 0.64; max 1.00
    # loss = 0.5 * (0.64 + 1.21 + 1.00) / 3 = 0.475; clip fraction 1/3
    values = torch.tensor([[1.5, 0.9, 3.0, 42.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.475)
    assert stats["value_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    # clipped term active at token 0 -> no gradient; else (V - R) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -1.1 / 3, 1.0 / 3, 0.0]]))
    # no clipping: 0.5 * (0.25 + 1.21 + 1.0) / 3 = 0.41
    loss_nc, _ = value_loss(values, old, returns, mask, clip_range_value=None)
    assert loss_nc.item() == pytest.approx(0.41)


def test_entropy():
    V = 7
    logits = torch.zeros(2, 3, V)
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(V)))
    torch.manual_seed(2)
    logits = torch.randn(2, 3, V) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert mean_entropy(logits, mask).item() == pytest.approx(expected[mask.bool()].mean().item(), rel=1e-5)


def test_entropy_with_minus_inf_logits():
    """Masked / top-k-filtered logits (-inf) add nothing: 4 equal finite logits of 7 -> log 4,
    finite, and the gradient is finite too (it was NaN: 0 * -inf)."""
    logits = torch.zeros(1, 2, 7)
    logits[..., 4:] = float("-inf")
    logits.requires_grad_(True)
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.full((1, 2), math.log(4)))
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    mask = torch.ones(1, 2)
    assert math.isfinite(mean_entropy(logits, mask).item())


def test_lm_loss_shift_and_ignore_index():
    # V = 2, all-zero logits: every counted token costs log 2
    labels = torch.tensor([[5, 1, 0, -100]])  # first label is never scored (nothing predicts it)
    logits = torch.zeros(1, 4, 2)
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(2))
    # position i predicts labels[i + 1]: make position 0 confident in token 1 -> first scored token costs ~0
    logits[0, 0] = torch.tensor([-20.0, 20.0])
    assert lm_loss(logits, labels).item() == pytest.approx(math.log(2) / 2, abs=1e-6)
    # equals PyTorch cross entropy on the explicitly shifted tensors
    torch.manual_seed(3)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)
    # nothing counted -> 0, with a (zero) gradient
    z = torch.randn(1, 3, 4, requires_grad=True)
    out = lm_loss(z, torch.full((1, 3), -100))
    out.backward()
    assert out.item() == 0.0 and (z.grad == 0).all()


def test_gather_logprobs():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [0.25, 0.75]
    torch.testing.assert_close(gather_logprobs(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))


def test_ppo_ptx_objective():
    assert ppo_ptx_objective(torch.tensor(0.5), torch.tensor(2.0), ptx_coef=0.25).item() == pytest.approx(1.0)
    assert ppo_ptx_objective(torch.tensor(0.5), torch.tensor(2.0), ptx_coef=0.0).item() == pytest.approx(0.5)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    # predicting the mean: Var[R - V] = Var[R] -> 0
    assert explained_variance(torch.full((1, 4), 2.0), returns, mask).item() == pytest.approx(0.0)
    # V = [1, 1, 1]: R - V = [0, 1, 2], same variance as R -> 0; V = [3, 2, 1]: R - V = [-2, 0, 2], var 8/3 vs 2/3 -> -3
    assert explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), returns, mask).item() == pytest.approx(-3.0)
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask).item())
