"""Running reward normalisation: Welford's online mean and variance.

InstructGPT normalises its reward model once, with a bias, so that labeller
demonstrations score 0 on average; online we keep a running mean/std of every
raw score served instead (as lm-human-preferences and TRL do), optionally frozen
after N scores so that the scale stops moving once it is well estimated.

    mean_n = mean_{n-1} + (x - mean_{n-1}) / n
    M2_n   = M2_{n-1} + (x - mean_{n-1}) * (x - mean_n)
    std    = sqrt(M2_n / (n - 1))          (sample std; 1 while n < 2)
    score  = (x - mean) / max(std, eps)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class NormStats:
    mean: float
    std: float
    count: int


class RunningNormalizer:
    """Running mean/std of raw scores. `apply(raw)` updates with `raw`, then normalises it."""

    def __init__(self, freeze_after: int = 0, eps: float = 1e-6):
        self.freeze_after = freeze_after
        self.eps = eps
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    @property
    def frozen(self) -> bool:
        return self.freeze_after > 0 and self.count >= self.freeze_after

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.count - 1)) if self.count > 1 else 1.0

    def stats(self) -> NormStats:
        return NormStats(self.mean, self.std, self.count)

    def update(self, xs: Sequence[float]) -> None:
        for x in xs:
            if self.frozen:
                return
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self._m2 += delta * (x - self.mean)

    def normalize(self, xs: Sequence[float]) -> list[float]:
        scale = max(self.std, self.eps)
        return [(x - self.mean) / scale for x in xs]

    def apply(self, raw: Sequence[float]) -> tuple[list[float], NormStats]:
        """Update the statistics with this request's raw scores, then normalise them."""
        self.update(raw)
        return self.normalize(raw), self.stats()
