"""GAE: a hand-worked example, a per-row loop reference, padding invariance."""

import pytest
import torch

from instructrl.rl import compute_gae


def test_gae_hand_worked():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # row 0: three real tokens
    #   t=2: delta = 1 + 0 (last token, no bootstrap) - 0.3 = 0.7         A2 = 0.7
    #   t=1: delta = 0 + 0.9 * 0.3 - 0.4 = -0.13    A1 = -0.13 + 0.72 * 0.7   = 0.374
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14    A0 = -0.14 + 0.72 * 0.374 = 0.12928
    #   returns = A + V = [0.62928, 0.774, 1.0]
    # row 1: two real tokens, the third is padding holding garbage (99)
    #   t=1: delta = -1 + 0 - 0.5 = -1.5                 A1 = -1.5
    #   t=0: delta = 0.2 + 0.9 * 0.5 - 1.0 = -0.35       A0 = -0.35 + 0.72 * -1.5 = -1.43
    #   returns = [-0.43, -1.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, -1.0, 99.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.12928, 0.374, 0.7], [-1.43, -1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.62928, 0.774, 1.0], [-0.43, -1.0, 0.0]]))


def test_gae_lambda_one_gamma_one_is_monte_carlo():
    # gamma = lam = 1: A_t = (sum of rewards from t) - V_t, returns = reward-to-go
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.5, -1.0, 2.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[5.5, 6.0, 1.0, 0.0]]))


def _loop_gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        last = 0.0
        for t in reversed(range(lengths[b])):
            next_v = values[b, t + 1].item() if t + 1 < lengths[b] else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(lengths[b]):
            ret[b, t] = adv[b, t] + values[b, t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0)])
def test_gae_matches_loop_with_random_lengths(gamma, lam):
    torch.manual_seed(0)
    B, T = 7, 13
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).double()
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _loop_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)


def test_gae_padding_invariance():
    torch.manual_seed(1)
    B, T = 5, 6
    mask = (torch.arange(T)[None, :] < torch.randint(1, T + 1, (B,))[:, None]).float()
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.95)
    garbage = torch.full((B, 5), torch.nan)
    rewards_p, values_p = torch.cat([rewards, garbage], 1), torch.cat([values, garbage], 1)
    adv_p, ret_p = compute_gae(rewards_p, values_p, torch.cat([mask, torch.zeros(B, 5)], 1), 0.99, 0.95)
    torch.testing.assert_close(adv_p[:, :T], adv)
    torch.testing.assert_close(ret_p[:, :T], ret)
    assert (adv_p[:, T:] == 0).all() and (ret_p[:, T:] == 0).all()


def test_gae_rejects_non_right_padded_mask():
    with pytest.raises(ValueError):
        compute_gae(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[0.0, 1.0, 1.0]]), 1.0, 0.95)
