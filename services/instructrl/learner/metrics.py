"""The learner's Prometheus metrics, declared once (names: docs/metrics.md, Learner), and its JSONL log.

`publish(stats)` sets every gauge from one iteration's stats dict (keys below are also
the JSONL keys); the JSONL log gets the same dict plus timings, the weight sync and, if
asked, the sample_ids.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

POLICY_VERSION = Gauge("instructrl_learner_policy_version", "Current policy version")
OPTIMIZER_STEP = Gauge("instructrl_learner_optimizer_step", "Optimizer steps (one per minibatch)")
PHASE_SECONDS = Gauge("instructrl_learner_phase_seconds", "Seconds of each phase of the last iteration", ["phase"])
POLICY_LAG = Histogram("instructrl_learner_policy_lag", "Learner version - record version",
                       buckets=(0, 1, 2, 3, 4, 6, 8, 16, 32))
SYNC_SECONDS = Histogram("instructrl_learner_weight_sync_seconds", "One broadcast to all replicas",
                         buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
SYNC_BYTES = Counter("instructrl_learner_weight_sync_bytes", "Bytes broadcast")
SYNC_FAILURES = Counter("instructrl_learner_weight_sync_failures", "Broadcasts that failed or timed out")
REPLICAS = Gauge("instructrl_learner_rollout_replicas", "Replicas in the broadcast group")

# stats key -> gauge (instructrl_learner_<key>)
_GAUGE_HELP = {
    "reward_mean": "RLHF reward: score - kl_coef * KL, summed over tokens",
    "score_mean": "Reward-model score",
    "kl_to_ref": "KL(policy || SFT) per sequence (k1, summed over tokens)",
    "kl_coef": "beta",
    "entropy": "Mean token entropy",
    "approx_kl": "KL(old || new) during the PPO epochs",
    "clip_fraction": "Fraction of clipped ratios",
    "policy_loss": "Clipped surrogate loss",
    "value_loss": "Clipped value loss",
    "ptx_loss": "Pretraining LM loss (PPO-ptx)",
    "explained_variance": "Of the value head on returns",
    "response_length_mean": "Tokens per response",
    "advantage_mean": "Before whitening",
    "advantage_std": "Before whitening",
    "logprob_mismatch_kl": "KL(vLLM sampler || learner) on the sampled tokens",
    "logprob_mismatch_max_abs": "Max abs log-prob difference",
    "tokens_per_second": "Trained tokens per second",
}
GAUGES = {k: Gauge(f"instructrl_learner_{k}", h) for k, h in _GAUGE_HELP.items()}


def publish(stats: dict[str, Any], phases: dict[str, float], lags: list[int]) -> None:
    """Set the gauges from one iteration's `stats` (floats), `phases` (seconds) and record lags."""
    POLICY_VERSION.set(stats["policy_version"])
    OPTIMIZER_STEP.set(stats["optimizer_step"])
    for k, g in GAUGES.items():
        if k in stats and stats[k] is not None and not math.isnan(stats[k]):
            g.set(stats[k])
    for phase, seconds in phases.items():
        PHASE_SECONDS.labels(phase).set(seconds)
    for lag in lags:
        POLICY_LAG.observe(lag)


def record_sync(seconds: float, nbytes: int, ok: int, failed: int) -> None:
    """One weight broadcast: its duration, bytes, failures and the group's size."""
    SYNC_SECONDS.observe(seconds)
    SYNC_BYTES.inc(nbytes)
    if failed:
        SYNC_FAILURES.inc()
    REPLICAS.set(ok)


class JsonlLog:
    """Append-only metrics log: one JSON object per line, flushed each write."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
