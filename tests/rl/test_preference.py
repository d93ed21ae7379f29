"""Bradley-Terry, InstructGPT K-wise ranking loss and DPO."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from instructrl.rl import bradley_terry_loss, dpo_loss, kwise_ranking_loss, sequence_logprobs


def test_bradley_terry_hand_worked():
    # -log sigmoid(2 - 0) = 0.126928, -log sigmoid(0 - 1) = 1.313262 -> mean 0.720095; 1 of 2 right
    loss, acc = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(0.720095, abs=1e-6)
    assert acc.item() == 0.5


def test_bradley_terry_is_stable_for_large_margins():
    chosen = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, torch.tensor([-1000.0, 1000.0]))
    assert loss.item() == pytest.approx(500.0)  # (0 + 1000) / 2, no inf
    loss.backward()
    assert torch.isfinite(chosen.grad).all()


def test_kwise_k3_hand_worked():
    # one prompt, K = 3, rewards of responses ranked best first: [3, 1, 2]
    # pairs (better, worse): (0,1): 3-1 = 2  -> -log sigmoid(2)  = 0.126928
    #                        (0,2): 3-2 = 1  -> -log sigmoid(1)  = 0.313262
    #                        (1,2): 1-2 = -1 -> -log sigmoid(-1) = 1.313262
    # loss = (0.126928 + 0.313262 + 1.313262) / C(3,2)=3 = 0.584484; accuracy 2/3
    loss, acc = kwise_ranking_loss(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([3]))
    assert loss.item() == pytest.approx(0.584484, abs=1e-6)
    assert acc.item() == pytest.approx(2 / 3)


def _loop_kwise(rewards, num):
    per_prompt, correct, total = [], 0, 0
    for b in range(rewards.shape[0]):
        k = int(num[b])
        terms = []
        for i, j in itertools.combinations(range(k), 2):  # i ranked above j
            d = rewards[b, i].item() - rewards[b, j].item()
            terms.append(-math.log(1 / (1 + math.exp(-d))))
            correct += d > 0
            total += 1
        per_prompt.append(sum(terms) / math.comb(k, 2))
    return sum(per_prompt) / len(per_prompt), correct / total


def test_kwise_matches_loop_with_random_k_and_garbage_padding():
    torch.manual_seed(0)
    B, K = 10, 9
    num = torch.randint(2, K + 1, (B,))
    rewards = torch.randn(B, K, dtype=torch.float64)
    pad = torch.arange(K)[None, :] >= num[:, None]
    rewards_nan = rewards.masked_fill(pad, torch.nan).requires_grad_(True)
    loss, acc = kwise_ranking_loss(rewards_nan, num)
    ref_loss, ref_acc = _loop_kwise(rewards, num)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert acc.item() == pytest.approx(ref_acc)
    loss.backward()
    assert torch.isfinite(rewards_nan.grad).all() and (rewards_nan.grad[pad] == 0).all()


def test_kwise_padding_columns_do_not_change_result():
    torch.manual_seed(1)
    rewards, num = torch.randn(4, 5), torch.tensor([2, 5, 3, 4])
    wider = torch.cat([rewards, torch.full((4, 3), 1e6)], dim=1)
    torch.testing.assert_close(kwise_ranking_loss(wider, num), kwise_ranking_loss(rewards, num))


def test_kwise_with_k2_equals_bradley_terry():
    torch.manual_seed(2)
    r = torch.randn(6, 2)
    loss, acc = kwise_ranking_loss(r, torch.full((6,), 2))
    bt_loss, bt_acc = bradley_terry_loss(r[:, 0], r[:, 1])
    torch.testing.assert_close(loss, bt_loss)
    torch.testing.assert_close(acc, bt_acc)


def test_kwise_weights_prompts_equally():
    # prompt A: K = 2 one pair with margin 0 -> log 2; prompt B: K = 4, all margins 0 -> log 2 each
    # equal prompt weights: mean(log 2, log 2) = log 2 regardless of pair counts
    loss, _ = kwise_ranking_loss(torch.zeros(2, 4), torch.tensor([2, 4]))
    assert loss.item() == pytest.approx(math.log(2))


def test_kwise_rejects_bad_counts():
    with pytest.raises(ValueError):
        kwise_ranking_loss(torch.zeros(2, 3), torch.tensor([1, 3]))
    with pytest.raises(ValueError):
        kwise_ranking_loss(torch.zeros(2, 3), torch.tensor([2, 4]))


def test_dpo_hand_worked():
    # chosen log-ratio = -10 - (-11) = 1, rejected = -12 - (-11) = -1, h = 2, beta h = 0.2
    # loss = -log sigmoid(0.2) = 0.598139; implicit rewards 0.1 and -0.1; accuracy 1
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    loss, chosen, rejected, acc = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1]))
    assert acc.item() == 1.0
    # label smoothing 0.1: 0.9 * 0.598139 + 0.1 * -log sigmoid(-0.2) = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139
    loss_ls, *_ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    assert loss_ls.item() == pytest.approx(0.618139, abs=1e-6)


def test_dpo_matches_formula_and_gradient_sign():
    torch.manual_seed(3)
    pc, pr = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    rc, rr = torch.randn(5), torch.randn(5)
    loss, *_ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    expected = -F.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raise chosen, lower rejected


def test_sequence_logprobs_padding_invariance():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -float("inf"), torch.nan]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(sequence_logprobs(logp, mask), torch.tensor([-3.5, -3.0]))
