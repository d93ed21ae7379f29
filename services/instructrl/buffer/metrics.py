"""Prometheus metrics of the buffer, declared once (names: docs/metrics.md, Buffer).

Label `stream` is "prompts" or "experience"; `reason` is one of `validate.REASONS`.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DEPTH = Gauge("instructrl_buffer_depth", "Entries not yet acked by the group", ["stream"])
CONSUMER_LAG = Gauge(
    "instructrl_buffer_consumer_lag", "Entries not yet delivered to the group", ["stream"])
PENDING = Gauge("instructrl_buffer_pending", "Entries delivered, not acked", ["stream"])
PUT_RECORDS = Counter("instructrl_buffer_put_records_total", "Records appended", ["stream"])
PUT_BYTES = Counter("instructrl_buffer_put_bytes_total", "Bytes appended", ["stream"])
GET_RECORDS = Counter(
    "instructrl_buffer_get_records_total", "Records handed to a consumer", ["stream"])
GET_BYTES = Counter("instructrl_buffer_get_bytes_total", "Bytes handed to a consumer", ["stream"])
STALE_DROPPED = Counter(
    "instructrl_buffer_stale_dropped_total", "Records older than the learner's pacing.max_policy_lag dropped",
    ["stream"])
DUPLICATES = Counter(
    "instructrl_buffer_duplicates_total", "Redeliveries of an already-used sample_id", ["stream"])
DEAD_LETTERS = Counter(
    "instructrl_buffer_dead_letters_total", "Poison records moved to the dead-letter stream",
    ["stream", "reason"])
REQUEUED = Counter(
    "instructrl_buffer_requeued_total", "Prompts queued again because their samples arrived too stale",
    ["stream"])
RECLAIMED = Counter(
    "instructrl_buffer_reclaimed_total", "Entries reclaimed from dead consumers", ["stream"])
BACKPRESSURE_WAIT = Histogram(
    "instructrl_buffer_backpressure_wait_seconds", "Time producers waited for room", ["stream"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
