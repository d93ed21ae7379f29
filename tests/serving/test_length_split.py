"""Padding-aware sub-batches: the DP against hand-worked costs and brute force; the online cost fit."""
from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from instructrl.serving.batcher import BatchingConfig, DynamicBatcher
from instructrl.serving.length_split import CostModel, split_by_length


def cost(lengths, groups, c):
    """Eq. (2) of length_split.py in tokens: sum_g (c + n_g * L_g)."""
    return sum(c + len(g) * max(lengths[i] for i in g) for g in groups)


def test_hand_worked_split():
    lengths = [90, 10, 10, 10]
    # one pass: c + 4 * 90 = 20 + 360 = 380; [10,10,10] + [90]: (20 + 30) + (20 + 90) = 160
    assert split_by_length(lengths, 20.0) == [[1, 2, 3], [0]]
    # padding of the batch is 4 * 90 - 120 = 240 <= c = 240: one pass, original order
    assert split_by_length(lengths, 240.0) == [[0, 1, 2, 3]]
    # c = 230: one pass 590, split 460 + 90 + 10... = (230 + 30) + (230 + 90) = 580 < 590
    assert split_by_length(lengths, 230.0) == [[1, 2, 3], [0]]
    # no estimate yet, or a single item: one pass
    assert split_by_length(lengths, None) == [[0, 1, 2, 3]]
    assert split_by_length([7], 0.0) == [[0]]
    # no fixed cost at all: every distinct length its own pass, shortest first
    assert split_by_length([30, 10, 20, 10], 0.0) == [[1, 3], [2], [0]]


def all_partitions(items):
    """Every set partition of `items` (Bell-number many; small inputs only)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in all_partitions(rest):
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]
        yield [[first]] + part


@pytest.mark.parametrize("seed", range(40))
def test_split_is_optimal_over_all_partitions(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    lengths = [rng.randint(1, 100) for _ in range(n)]
    c = rng.choice([0.0, 5.0, 37.5, 120.0, 1000.0])
    groups = split_by_length(lengths, c)
    assert sorted(itertools.chain(*groups)) == list(range(n))  # every item exactly once
    best = min(cost(lengths, p, c) for p in all_partitions(list(range(n))))
    assert cost(lengths, groups, c) == pytest.approx(best)
    for g in groups if len(groups) > 1 else []:
        assert [lengths[i] for i in g] == sorted(lengths[i] for i in g)


def test_cost_model_recovers_a_line_and_refuses_without_evidence():
    m = CostModel(min_obs=16)
    for k in range(15):
        m.observe(100 + 50 * k, 0.002 + 1e-5 * (100 + 50 * k))
    assert m.fit() is None  # fewer than min_obs passes
    m.observe(900, 0.002 + 1e-5 * 900)
    a, b = m.fit()
    assert a == pytest.approx(0.002, rel=1e-6) and b == pytest.approx(1e-5, rel=1e-6)
    assert m.overhead_tokens() == pytest.approx(200.0, rel=1e-6)

    same = CostModel(min_obs=4)
    for _ in range(20):
        same.observe(500, 0.01)
    assert same.fit() is None  # every pass the same size: b cannot be told from a

    free = CostModel(min_obs=4)
    for k in range(20):
        free.observe(100 * (k + 1), 0.01)  # time does not grow with tokens
    assert free.overhead_tokens() is None


def test_cost_model_forgets_old_passes():
    m = CostModel(decay=0.9, min_obs=4)
    for k in range(200):
        m.observe(100 * (1 + k % 7), 0.1 + 1e-3 * 100 * (1 + k % 7))   # c = 100 tokens
    for k in range(200):
        m.observe(100 * (1 + k % 7), 0.001 + 1e-3 * 100 * (1 + k % 7))  # c = 1 token
    assert m.overhead_tokens() == pytest.approx(1.0, rel=1e-3)


def test_batcher_runs_sorted_sub_batches_once_the_cost_is_known():
    async def main():
        seen = []

        def forward(items):
            seen.append(list(items))
            return [-x for x in items]

        b = await DynamicBatcher(forward, BatchingConfig(max_wait_ms=50), "t").start()
        for k in range(20):  # as if measured: a = 2 ms, b = 0.1 ms/token, c = 20 tokens
            b.cost.observe(10 * (k + 1), 0.002 + 1e-4 * 10 * (k + 1))
        lengths = {0: 90, 1: 10, 2: 10, 3: 10}
        outs = await asyncio.gather(*[b.submit([x], [lengths[x]]) for x in range(4)])
        assert outs == [[0], [-1], [-2], [-3]]
        assert seen == [[1, 2, 3], [0]]  # shortest first; the long item alone

        seen.clear()
        off = await DynamicBatcher(forward, BatchingConfig(max_wait_ms=50, split_by_length=False), "t").start()
        off.cost = b.cost
        await asyncio.gather(*[off.submit([x], [lengths[x]]) for x in range(4)])
        assert seen == [[0, 1, 2, 3]]
        await b.close()
        await off.close()
    asyncio.run(asyncio.wait_for(main(), 20))
