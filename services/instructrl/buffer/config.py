"""Typed configuration of the Redis experience buffer (`buffer.*` in a run's YAML).

Two concerns, nested: `buffer.redis` says how to reach Redis, the rest says how the
streams behave. Each field's help is its `--help-config` line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from instructrl.config import field

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class RedisConfig:
    """How to reach Redis: URL, credentials, TLS, retries."""

    url: str = field("redis://127.0.0.1:6379/0", help="redis:// or rediss:// (TLS) URL; may carry `user:password@`.")
    username: str | None = field(None, help="ACL user; overrides the URL's user when set.")
    password: str | None = field(None, help="Password; when unset, $INSTRUCTRL_REDIS_PASSWORD, then the URL's.")
    tls_ca_file: str | None = field(None, help="CA bundle to verify the server's certificate (rediss:// only).")
    tls_cert_file: str | None = field(None, help="Client certificate for mutual TLS (rediss:// only).")
    tls_key_file: str | None = field(None, help="Key of the client certificate (rediss:// only).")
    tls_check_hostname: bool = field(True, help="Check that the server certificate names the URL's host.")
    socket_timeout_s: float = field(30.0, help="Read timeout of one command; must exceed `buffer.block_ms`.")
    connect_timeout_s: float = field(5.0, help="TCP + TLS connect timeout.")
    retry_attempts: int = field(12, help="Reconnect attempts per command after a connection error (0 = none).")
    retry_base_s: float = field(0.05, help="First backoff between reconnect attempts; doubles with jitter.")
    retry_cap_s: float = field(2.0, help="Longest backoff between reconnect attempts.")


@dataclass
class BufferConfig:
    """The prompt and experience streams of one run."""

    RENAMED: ClassVar[dict[str, str]] = {
        "max_policy_lag": "pacing.max_policy_lag (a learner setting)",
        "stale_policy": "pacing.stale_policy (a learner setting)",
    }

    redis: RedisConfig = field(default_factory=RedisConfig, help="how to reach Redis")
    run_id: str = field("default", help="Namespace: every key is `instructrl:{<run_id>}:...` ([A-Za-z0-9._-]).")
    capacity: int = field(4096, help="Most experience records not yet delivered to the learner's group; producers "
                                     "wait beyond it (records the learner holds until its checkpoint do not count).")
    prompt_capacity: int = field(100_000, help="Most prompts not yet claimed in the prompt stream.")
    put_timeout_s: float = field(60.0, help="How long a producer waits for room before raising `BufferFull`.")
    block_ms: int = field(1000, help="How long a consumer's read blocks when the stream is empty.")
    claim_idle_ms: int = field(
        60_000, help="An entry pending this long at one consumer is reclaimed by another (XAUTOCLAIM).")
    max_deliveries: int = field(5, help="An entry delivered more often than this goes to the dead-letter stream.")
    experience_group: str = field("learner", help="Consumer group that reads the experience stream.")
    prompt_group: str = field("rollout", help="Consumer group the rollout replicas claim prompts through.")
    dead_letter_maxlen: int = field(
        100_000, help="Approximate cap of the dead-letter stream (a forensic log, never trained on).")
    put_batch: int = field(256, help="Records appended per round trip.")
    gauge_interval_s: float = field(1.0, help="Least seconds between two refreshes of the depth/lag/pending gauges.")

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} must match {_RUN_ID.pattern}")
        if self.capacity < 1 or self.prompt_capacity < 1 or self.put_batch < 1:
            raise ValueError("capacity, prompt_capacity and put_batch must be >= 1")
        if self.block_ms / 1000 >= self.redis.socket_timeout_s:
            raise ValueError("buffer.block_ms must be shorter than redis.socket_timeout_s")


@dataclass(frozen=True)
class Keys:
    """Redis keys of one run. The braces are a Redis Cluster hash tag: all keys of a run
    live in one slot, so the Lua scripts that touch several of them stay atomic there too."""

    prefix: str

    @classmethod
    def for_run(cls, run_id: str) -> Keys:
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run_id {run_id!r} must match {_RUN_ID.pattern}")
        return cls(f"instructrl:{{{run_id}}}")

    @property
    def prompts(self) -> str:
        """Stream of `PromptRecord`s; group `rollout`."""
        return f"{self.prefix}:prompts"

    def prompts_queued(self, epoch: int) -> str:
        """Set of prompt_ids already queued in `epoch` (makes `put_prompts` idempotent)."""
        return f"{self.prefix}:prompts:queued:{int(epoch)}"

    @property
    def experience(self) -> str:
        """Stream of `Experience` records; group `learner`."""
        return f"{self.prefix}:experience"

    @property
    def prompt_records(self) -> str:
        """Hash prompt_id -> serialized PromptRecord, kept once per run to re-queue stale prompts."""
        return f"{self.prefix}:prompts:records"

    @property
    def pacing(self) -> str:
        """Hash of the learner's pacing state: version, max_policy_lag, batch_size, held, finished."""
        return f"{self.prefix}:pacing"

    @property
    def admitted(self) -> str:
        """Zset of admission tickets of generation in flight (buffer/pacing.py)."""
        return f"{self.prefix}:experience:admitted"

    def reserved(self, stream: str) -> str:
        """Zset of producers' reservations of room in `stream` (see streams.RESERVE_LUA)."""
        return f"{stream}:reserved"

    @staticmethod
    def outcomes(stream: str) -> str:
        """Hash reason -> entries of `stream` deleted for that reason ("committed", "stale",
        "dead:<reason>", ...; see scripts.SETTLE_LUA): with XLEN, what became of every entry added."""
        return f"{stream}:outcomes"

    @property
    def dead(self) -> str:
        """Dead-letter stream: poison records with their reason."""
        return f"{self.prefix}:dead"

    @property
    def seen(self) -> str:
        """Hash sample_id -> commit token of every experience record trained on."""
        return f"{self.prefix}:seen"

    @property
    def pattern(self) -> str:
        """SCAN pattern matching every key of the run."""
        return f"{self.prefix}:*"
