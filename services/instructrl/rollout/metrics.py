"""Prometheus metrics of a rollout replica (names: docs/metrics.md, label `replica`)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

GENERATED_TOKENS = Counter("instructrl_rollout_generated_tokens", "tokens generated", ["replica"])
REQUESTS_IN_FLIGHT = Gauge("instructrl_rollout_requests_in_flight", "vLLM requests running", ["replica"])
GENERATE_SECONDS = Histogram("instructrl_rollout_generate_seconds", "latency of one Generate batch",
                             ["replica"], buckets=_LAT)
POLICY_VERSION = Gauge("instructrl_rollout_policy_version", "version of the loaded weights", ["replica"])
WEIGHT_UPDATE_SECONDS = Histogram("instructrl_rollout_weight_update_seconds",
                                  "pause + receive + load + resume", ["replica"], buckets=_LAT)
WEIGHT_UPDATE_BYTES = Counter("instructrl_rollout_weight_update_bytes",
                              "bytes received over the weight group", ["replica"])
WEIGHT_UPDATE_FAILURES = Counter("instructrl_rollout_weight_update_failures",
                                 "updates that timed out or failed", ["replica"])
PROMPTS_CLAIMED = Counter("instructrl_rollout_prompts_claimed", "prompts taken from the prompt stream", ["replica"])
PROMPTS_FAILED = Counter("instructrl_rollout_prompts_failed", "prompts whose work failed for good (not a transient "
                         "error, or out of retry.attempts), by outcome: released (for redelivery) or "
                         "dead_lettered (delivered buffer.max_deliveries times)", ["replica", "outcome"])
PROMPTS_ACKED = Counter("instructrl_rollout_prompts_acked", "prompts whose experience was written", ["replica"])
ADMISSION_WAIT = Counter("instructrl_rollout_admission_wait_seconds",
                         "seconds the worker waited for the learner's pacing to admit generation, by reason "
                         "(full: the learner is behind; stale: these weights are too old; no_learner; finished)",
                         ["replica", "reason"])
SAMPLES_ADMITTED = Counter("instructrl_rollout_samples_admitted", "samples admitted by pacing", ["replica"])
