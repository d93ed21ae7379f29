"""KL estimators, KL-shaped rewards and the KL controllers."""

import math

import pytest
import torch

from instructrl.rl import AdaptiveKLController, FixedKLController, kl_estimate, kl_shaped_rewards


def test_estimators_hand_worked():
    # p(a) = 0.5 under the policy, q(a) = 0.25 under the reference: r = q/p = 0.5
    logp = torch.tensor([[math.log(0.5), 0.0]])
    ref = torch.tensor([[math.log(0.25), 5.0]])
    m = torch.tensor([[1.0, 0.0]])
    # k1 = log p - log q = log 2 = 0.693147
    torch.testing.assert_close(kl_estimate(logp, ref, m, "k1"), torch.tensor([[0.693147, 0.0]]))
    # k2 = 0.5 * (log 2)^2 = 0.240227
    torch.testing.assert_close(kl_estimate(logp, ref, m, "k2"), torch.tensor([[0.240227, 0.0]]))
    # k3 = (r - 1) - log r = -0.5 + log 2 = 0.193147
    torch.testing.assert_close(kl_estimate(logp, ref, m, "k3"), torch.tensor([[0.193147, 0.0]]))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, m, "k4")


def test_k1_k3_unbiased_k3_nonnegative():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(6), torch.randn(6)
    logp_all, logq_all = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    true_kl = (logp_all.exp() * (logp_all - logq_all)).sum()
    a = torch.multinomial(logp_all.exp(), 200_000, replacement=True)[None, :]  # a ~ p
    logp, logq = logp_all[a], logq_all[a]
    m = torch.ones_like(logp)
    for kind in ("k1", "k3"):
        assert kl_estimate(logp, logq, m, kind).mean().item() == pytest.approx(true_kl.item(), abs=0.01)
    assert (kl_estimate(logp, logq, m, "k3") >= 0).all()
    assert (kl_estimate(logp, logq, m, "k2") >= 0).all()


def test_shaped_rewards_hand_worked():
    # row 0: 3 tokens; row 1: 1 token then padding (pad values are garbage)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, 7.0, 7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-3.0, -9.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    score = torch.tensor([2.0, -1.0])
    rewards, kl = kl_shaped_rewards(score, logp, ref, m, kl_coef=0.1)
    # k1 = logp - ref: row 0 = [0.5, -1.0, 0.0]; row 1 = [2.0, pad, pad]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]))
    # rewards = -0.1 * kl, + score on the last real token
    # row 0: [-0.05, 0.1, 0 + 2.0]; row 1: [-0.2 + (-1.0), 0, 0]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-1.2, 0.0, 0.0]]))


def _loop_shaped_rewards(score, logp, ref, lengths, kl_coef):
    B, T = logp.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(lengths[b]):
            r = math.exp(ref[b, t].item() - logp[b, t].item())
            out[b, t] = -kl_coef * ((r - 1) - math.log(r))
        out[b, lengths[b] - 1] += score[b].item()
    return out


def test_shaped_rewards_match_loop_with_random_lengths():
    torch.manual_seed(2)
    B, T = 8, 11
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    m = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    logp, ref = -torch.rand(B, T, dtype=torch.float64) * 3, -torch.rand(B, T, dtype=torch.float64) * 3
    score = torch.randn(B, dtype=torch.float64)
    rewards, _ = kl_shaped_rewards(score, logp, ref, m, kl_coef=0.05, kind="k3")
    torch.testing.assert_close(rewards, _loop_shaped_rewards(score, logp, ref, lengths, 0.05))
    # sum over tokens of the shaped reward = score - beta * sequence KL
    kl_seq = kl_estimate(logp, ref, m, "k3").sum(-1)
    torch.testing.assert_close(rewards.sum(-1), score - 0.05 * kl_seq)


def test_shaped_rewards_padding_invariance():
    torch.manual_seed(3)
    B, T = 4, 6
    m = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]).float()
    logp, ref, score = torch.randn(B, T), torch.randn(B, T), torch.randn(B)
    rewards, kl = kl_shaped_rewards(score, logp, ref, m, 0.2)
    pad = lambda x, v: torch.cat([x, torch.full((B, 4), v)], dim=1)  # noqa: E731
    rewards_p, kl_p = kl_shaped_rewards(score, pad(logp, 3.0), pad(ref, -50.0), pad(m, 0.0), 0.2)
    torch.testing.assert_close(rewards_p[:, :T], rewards)
    torch.testing.assert_close(kl_p[:, :T], kl)
    assert (rewards_p[:, T:] == 0).all() and (kl_p[:, T:] == 0).all()


def test_shaped_rewards_rejects_empty_or_left_padded_rows():
    logp = ref = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        kl_shaped_rewards(torch.zeros(2), logp, ref, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), 0.1)
    with pytest.raises(ValueError):
        kl_shaped_rewards(torch.zeros(2), logp, ref, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), 0.1)


def test_adaptive_controller_one_step_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 above target 6: error = 9/6 - 1 = 0.5, clipped to 0.2
    # mult = 1 + 0.2 * 256 / 10000 = 1.00512 -> beta = 0.100512
    ctl.update(current_kl=9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.100512)
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 5 below target: error = 5/6 - 1 = -1/6 (inside the clip)
    # mult = 1 - (1/6) * 0.0256 = 0.99573333 -> beta = 0.099573333
    ctl.update(current_kl=5.0, n_steps=256)
    assert ctl.value == pytest.approx(0.099573333)
    # KL far below target: error clipped at -0.2 -> mult = 1 - 0.2 * 0.0256 = 0.99488
    ctl.update(current_kl=0.0, n_steps=256)
    assert ctl.value == pytest.approx(0.099573333 * 0.99488)


def test_controllers_checkpoint_resume_continues_the_same_curve():
    kls = [8.0, 7.0, 2.0, 6.5, 12.0, 1.0]
    straight = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls:
        straight.update(kl, 64)
    first = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls[:3]:
        first.update(kl, 64)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    resumed.load_state_dict(dict(first.state_dict()))
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.value == straight.value

    fixed = FixedKLController(0.02)
    fixed.update(100.0, 512)
    assert fixed.value == 0.02
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.02
