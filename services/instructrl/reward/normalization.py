"""Reward normalisation: the RM stage's saved statistics, or Welford's running mean and variance.

InstructGPT normalises its reward model once, with a bias, so that labeller
demonstrations score 0 on average. `SavedNormalizer` does that with the mean (and
std) our RM stage measured on the SFT demonstrations and saved in the model's
`instructrl.json`: fixed, so every reward replica gives the same scores. Departure:
it also divides by that std (a constant rescaling of the reward, equivalent to
scaling `kl_coef`). `RunningNormalizer` keeps a running mean/std of every raw score
served instead (as lm-human-preferences and TRL do), optionally frozen after N scores
so that the scale stops moving once it is well estimated; each replica keeps its own.

    mean_n = mean_{n-1} + (x - mean_{n-1}) / n
    M2_n   = M2_{n-1} + (x - mean_{n-1}) * (x - mean_n)
    std    = sqrt(M2_n / (n - 1))          (sample std; 1 while n < 2)
    score  = (x - mean) / max(std, eps)
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence

from instructrl.config import ConfigError


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


class SavedNormalizer:
    """Fixed `(raw - mean) / std` with the RM stage's statistics; `count` 0 marks them fixed."""

    def __init__(self, mean: float, std: float, eps: float = 1e-6):
        self.mean, self.std, self.eps = float(mean), float(std), eps

    @classmethod
    def from_model_dir(cls, model_dir: str, eps: float = 1e-6) -> SavedNormalizer:
        """Read `reward_mean`/`reward_std` from `<model_dir>/instructrl.json` (written by `instructrl rm`)."""
        path = pathlib.Path(model_dir) / "instructrl.json"
        try:
            info = json.loads(path.read_text())
            mean, std = float(info["reward_mean"]), float(info["reward_std"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"normalization.source=saved: {path} has no reward_mean/reward_std "
                              f"(written by `instructrl rm`): {type(e).__name__}: {e}") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ConfigError(f"normalization.source=saved: {path}: reward_mean {mean}, reward_std {std} "
                              "are not a finite mean and a positive std")
        return cls(mean, std, eps)

    def stats(self) -> NormStats:
        return NormStats(self.mean, self.std, 0)

    def apply(self, raw: Sequence[float]) -> tuple[list[float], NormStats]:
        scale = max(self.std, self.eps)
        return [(x - self.mean) / scale for x in raw], self.stats()
