"""Retries of the rollout worker's calls: only transient failures, bounded by default.

A failure is transient, and worth the same call again after a backoff, when its type or gRPC
status code says so, never its message text:

- gRPC UNAVAILABLE (the service is down, restarting, draining), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED
  (overloaded: the server's queue is full);
- a lost Redis connection or a Redis timeout (`redis.exceptions.ConnectionError` / `TimeoutError`)
  and a full experience buffer (`BufferFull`: the learner is behind).

Everything else (INVALID_ARGUMENT, INTERNAL, UNKNOWN, FAILED_PRECONDITION, ... : the request or
the service's model is at fault) fails at once: the worker gives the prompt back for redelivery
and, once it was delivered `buffer.max_deliveries` times, dead-letters it with the error
(worker.py), so one poison prompt never stalls a replica.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import redis

from instructrl.buffer.streams import BufferFull
from instructrl.config import field

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.RESOURCE_EXHAUSTED})
TRANSIENT_TYPES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, BufferFull)


@dataclasses.dataclass
class RetryConfig:
    base_s: float = field(0.2, help="first backoff after a transient failure")
    cap_s: float = field(10.0, help="longest backoff")
    attempts: int = field(10, help="attempts of one batch's call (Generate, Score, LogProbs, experience put) "
                                   "before its prompts are given back (0 = until the service is back); the "
                                   "loop's own calls (admission, claim, ack) wait for Redis and the rollout "
                                   "service without a limit")


class Stopped(Exception):
    """The worker was asked to stop while waiting for a service."""


def transient(e: BaseException) -> bool:
    """True when `e` is worth retrying: by gRPC status code or exception type (see the module doc)."""
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code() in TRANSIENT_CODES
    return isinstance(e, TRANSIENT_TYPES)


def describe(e: BaseException) -> str:
    """`CODE: details` of a gRPC error, else the exception's repr (for logs and dead letters)."""
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else repr(e)


async def retry(what: str, fn: Callable[[], Awaitable[T]], cfg: RetryConfig, stop: asyncio.Event,
                bounded: bool = True) -> T:
    """`await fn()` until it succeeds, backing off (with jitter) after transient failures; at most
    `cfg.attempts` attempts when `bounded` (and attempts > 0). Raises the last error otherwise,
    or `Stopped` when `stop` is set while waiting."""
    delay, attempt = cfg.base_s, 0
    while True:
        try:
            return await fn()
        except Exception as e:  # noqa: BLE001 - classified below
            attempt += 1
            if not transient(e) or (bounded and cfg.attempts and attempt >= cfg.attempts):
                raise
            log.warning("%s failed (attempt %d, retrying in %.1fs): %s", what, attempt, delay, describe(e)[:300])
        try:
            await asyncio.wait_for(stop.wait(), delay * random.uniform(0.8, 1.2))
            raise Stopped(what)
        except TimeoutError:
            pass
        delay = min(delay * 2, cfg.cap_s)
