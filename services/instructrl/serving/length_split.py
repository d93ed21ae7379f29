"""Padding-aware sub-batches: sort a batch by length and cut it where that saves time.

Notation: `n` items in a batch, `len_i` their token lengths, `L_g` the longest item
of sub-batch `g`, `n_g` its item count.

A forward pass over a right-padded batch costs about

    seconds = a + b * n * L_max                        (1)

`a` is the fixed cost of one pass (Python dispatch, kernel launches), `b` the cost
of one padded token. Running a batch as sub-batches `g` costs

    sum_g (a + b * n_g * L_g)  =  b * sum_g (c + n_g * L_g),   c = a / b     (2)

so only `c`, the fixed cost in tokens, decides the split. For sorted lengths the
best partition is contiguous (a longer item never belongs to a shorter group than
a shorter item), and `split_by_length` finds it by dynamic programming in O(n^2).
One pass is kept when the whole padding of the batch, `n * L_max - sum len_i`, is
no more than `c`: no split can then save anything.

`CostModel` fits (1) online by exponentially weighted least squares of measured
forward seconds on padded tokens. Fitted in the reward service on this project's
2-core CPU machine (`bench/scoring.py`, docs/services.md): a 2-layer width-32 model
has `c` of 5,000-50,000 tokens (batches run whole), width 128 100-150 (batches of 16
mixed-length items, 24-96 tokens, run as 2-4 sorted sub-batches, which took 25-30%
less time than one padded pass).
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def split_by_length(lengths: Sequence[int], overhead_tokens: float | None) -> list[list[int]]:
    """Indices of `lengths` grouped into sub-batches minimising (2), shortest group first.

    `overhead_tokens` is `c = a / b`; None (no cost estimate yet) keeps one group. One
    group that is kept whole keeps the original order; split groups are sorted by length.
    """
    n = len(lengths)
    if n <= 1 or overhead_tokens is None:
        return [list(range(n))]
    longest, total = max(lengths), sum(lengths)
    if n * longest - total <= overhead_tokens:  # all the padding is worth less than one more pass
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    ls = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted items
    cut = [0] * (n + 1)            # cut[j]: start of the last group in best[j]
    for j in range(1, n + 1):
        lj = ls[j - 1]             # the longest item of any group ending at j
        for i in range(j):
            cost = best[i] + overhead_tokens + (j - i) * lj
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class CostModel:
    """Online fit of `seconds = a + b * padded_tokens` (1) over recent forward passes.

    Exponentially weighted least squares (weight `decay**age`), so the fit follows a
    machine whose load changes. `overhead_tokens()` is `a / b`, or None until at least
    `min_obs` passes of spread sizes (coefficient of variation >= 0.1) were seen, or
    when the fit says tokens cost nothing.
    """

    def __init__(self, decay: float = 0.98, min_obs: int = 16):
        self.decay, self.min_obs = decay, min_obs
        self.count = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, padded_tokens: float, seconds: float) -> None:
        d, x, y = self.decay, float(padded_tokens), float(seconds)
        self._w = d * self._w + 1.0
        self._x = d * self._x + x
        self._y = d * self._y + y
        self._xx = d * self._xx + x * x
        self._xy = d * self._xy + x * y
        self.count += 1

    def fit(self) -> tuple[float, float] | None:
        """`(a, b)` of (1) in seconds and seconds per token, or None without enough evidence."""
        if self.count < self.min_obs:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var <= (0.1 * mx) ** 2:  # all passes about the same size: b is not identifiable
            return None
        b = (self._xy / self._w - mx * my) / var
        if b <= 0:
            return None
        return max(my - b * mx, 0.0), b

    def overhead_tokens(self) -> float | None:
        ab = self.fit()
        return None if ab is None else ab[0] / ab[1]
