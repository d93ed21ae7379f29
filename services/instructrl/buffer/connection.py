"""Redis clients from a `RedisConfig`: URL, ACL user/password, TLS, reconnect with backoff.

Every command is retried after a connection error or timeout (including Redis's
LOADING reply while it replays its AOF after a restart) with exponential backoff and
jitter, `retry_attempts` times. The buffer's writes are safe to retry: appends may be
duplicated (consumers dedup by sample_id) and acks are idempotent.
"""
from __future__ import annotations

import os
from typing import Any

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ConnectionError, TimeoutError
from redis.retry import Retry

from instructrl.buffer.config import RedisConfig

PASSWORD_ENV = "INSTRUCTRL_REDIS_PASSWORD"


def client_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    """Keyword arguments of the client (everything but `retry`)."""
    kw: dict[str, Any] = {
        "socket_timeout": cfg.socket_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry_on_error": [ConnectionError, TimeoutError, OSError],
        "decode_responses": False,  # records are bytes; never decoded as text, never unpickled
    }
    if cfg.username:
        kw["username"] = cfg.username
    password = cfg.password or os.environ.get(PASSWORD_ENV)
    if password:
        kw["password"] = password
    if cfg.url.startswith("rediss://"):
        kw["ssl_check_hostname"] = cfg.tls_check_hostname
        if cfg.tls_ca_file:
            kw["ssl_ca_certs"] = cfg.tls_ca_file
        if cfg.tls_cert_file:
            kw["ssl_certfile"] = cfg.tls_cert_file
        if cfg.tls_key_file:
            kw["ssl_keyfile"] = cfg.tls_key_file
    elif cfg.tls_ca_file or cfg.tls_cert_file:
        raise ValueError("TLS files given but the URL is not rediss://")
    return kw


def _retryable(extra):
    """redis-py files auth failures under ConnectionError; retrying them only delays a
    clear error (wrong password / ACL user), so they fail at once."""
    def check(err: Exception) -> bool:
        if isinstance(err, (AuthenticationError, AuthorizationError)):
            return False
        return extra(err) if extra else True
    return check


class _Retry(Retry):
    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        return super().call_with_retry(do, fail, _retryable(is_retryable), with_failure_count)


def _backoff(cfg: RedisConfig) -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=cfg.retry_cap_s, base=cfg.retry_base_s)


def redis_from_url(cfg: RedisConfig | str) -> redis.Redis:
    """A sync client for `cfg` (or a bare URL) that reconnects with backoff."""
    cfg = RedisConfig(url=cfg) if isinstance(cfg, str) else cfg
    retry = _Retry(_backoff(cfg), cfg.retry_attempts)
    return redis.Redis.from_url(cfg.url, retry=retry, **client_kwargs(cfg))


def delete_run(client: redis.Redis, run_id: str) -> int:
    """Delete every key of `run_id` (SCAN + UNLINK; never FLUSHDB). Returns keys removed."""
    from instructrl.buffer.config import Keys

    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=Keys.for_run(run_id).pattern, count=500):
        batch.append(key)
        if len(batch) >= 500:
            removed += client.unlink(*batch)
            batch.clear()
    if batch:
        removed += client.unlink(*batch)
    return removed
