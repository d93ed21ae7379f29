"""Masked reductions: hand numbers, a per-row loop reference, padding invariance."""

import math

import pytest
import torch

from instructrl.rl import check_right_padded, masked_mean, masked_sum, masked_var, masked_whiten


def random_right_padded(B: int, T: int, min_len: int = 1) -> torch.Tensor:
    lengths = torch.randint(min_len, T + 1, (B,))
    return (torch.arange(T)[None, :] < lengths[:, None]).float()


def test_hand_worked_sum_mean_var():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # real entries: 1, 2, 3, 4 -> sum 10, mean 2.5
    assert masked_sum(x, m).item() == 10.0
    assert masked_mean(x, m).item() == 2.5
    # per-row: (1+2+3)/3 = 2, 4/1 = 4
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(masked_sum(x, m, dim=-1), torch.tensor([6.0, 4.0]))
    # squared deviations from 2.5: 2.25 + 0.25 + 0.25 + 2.25 = 5 -> biased 5/4, unbiased 5/3
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(1.25)
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(5 / 3)


def test_whiten_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # mean 2.5, unbiased var 5/3 -> (x - 2.5) / sqrt(5/3 + 1e-8)
    s = math.sqrt(5 / 3 + 1e-8)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, m), expected)
    # shift_mean=False keeps the mean: + 2.5 on real entries, padding stays 0
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False), (expected + 2.5) * m)


def test_whiten_matches_loop_reference():
    torch.manual_seed(0)
    B, T = 6, 9
    x = torch.randn(B, T) * 3 + 1
    m = random_right_padded(B, T)
    real = [x[b, t].item() for b in range(B) for t in range(T) if m[b, t] > 0]
    n = len(real)
    mean = sum(real) / n
    var = sum((v - mean) ** 2 for v in real) / (n - 1)
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            if m[b, t] > 0:
                expected[b, t] = (x[b, t].item() - mean) / math.sqrt(var + 1e-8)
    out = masked_whiten(x, m)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # whitened real entries: mean 0, unbiased variance 1
    assert masked_mean(out, m).abs().item() < 1e-5
    assert masked_var(out, m).item() == pytest.approx(1.0, abs=1e-4)


def test_padding_invariance_even_with_nan():
    torch.manual_seed(1)
    x = torch.randn(4, 5)
    m = random_right_padded(4, 5)
    x_padded = torch.cat([torch.where(m.bool(), x, torch.nan), torch.full((4, 3), torch.inf)], dim=1)
    m_padded = torch.cat([m, torch.zeros(4, 3)], dim=1)
    assert masked_sum(x_padded, m_padded).item() == pytest.approx(masked_sum(x, m).item())
    torch.testing.assert_close(masked_mean(x_padded, m_padded, dim=1), masked_mean(x, m, dim=1))
    torch.testing.assert_close(masked_var(x_padded, m_padded), masked_var(x, m))
    w = masked_whiten(x_padded, m_padded)
    torch.testing.assert_close(w[:, :5], masked_whiten(x, m))
    assert (w[:, 5:] == 0).all() and torch.isfinite(w).all()


def test_bool_mask_and_gradient_stays_off_padding():
    x = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    m = torch.tensor([[True, True, False]])
    masked_mean(x, m).backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5, 0.0]]))


def test_unbiased_var_needs_two_entries():
    with pytest.raises(ValueError):
        masked_var(torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.0]]))


def test_check_right_padded():
    check_right_padded(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError):
        check_right_padded(torch.tensor([[0, 1, 1]]))  # left padding
    with pytest.raises(ValueError):
        check_right_padded(torch.tensor([[1, 0, 1]]))  # hole
    with pytest.raises(ValueError):
        check_right_padded(torch.tensor([[1, 0], [0, 0]]), allow_empty=False)
