"""Server-side dynamic batching: concurrent requests share one forward pass.

A request's items are queued one by one with their token length; a background
task takes items from the head of the queue and runs them together once the
batch is full or the oldest item has waited `max_wait_ms`:

    padded tokens of a batch = max(length) * len(batch) <= max_batch_tokens
    len(batch) <= max_batch_size

The forward pass runs in one worker thread (`run_in_executor`), one batch at a
time, so torch sees a single caller and its intra-op thread count is what the
service configured. While a forward runs, new items keep queueing and the next
batch takes them all: the busier the service, the larger its batches.

Items whose request has been cancelled or has passed its deadline before their
batch starts are dropped and never reach the model. The queue is bounded:
`submit` raises `ResourceExhausted` when it would overflow.

With `enabled=False` no two requests share a forward pass and nothing waits: a
request's items run together (split by the same limits), the baseline of
`bench/scoring.py`.

Padding-aware sub-batches (`split_by_length`, on by default): a batch taken from
the queue is sorted by length and run as the sub-batches that minimise the
estimated time, `sum(a + b * items * longest)`, with `a` (fixed cost of a pass)
and `b` (cost of a padded token) fitted online from the measured passes
(length_split.py). A model dominated by per-pass overhead keeps one pass; a
compute-bound one stops paying for padding. Shortest sub-batches run first.

The forward function returns one result per item, in order; a result that is
an `Exception` fails only its own item (e.g. a rule-based reward rejecting one
input), an exception raised by the forward fails the items of that pass.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from instructrl.config import field
from instructrl.serving.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from instructrl.serving.length_split import CostModel, split_by_length

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# docs/metrics.md, "Reward and reference (server-side batching)".
BATCH_SIZE = Histogram(
    "instructrl_batch_size", "items per forward pass", ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Counter("instructrl_batch_tokens", "tokens processed (rate = tokens/s)", ["service"])
BATCH_OVERHEAD = Gauge(
    "instructrl_batch_overhead_tokens", "fitted fixed cost of one forward pass, in padded tokens "
    "(a / b; NaN until fitted)", ["service"])
BATCH_WAIT = Histogram(
    "instructrl_batch_wait_seconds", "time an item waited for its batch", ["service"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


@dataclasses.dataclass
class BatchingConfig:
    enabled: bool = field(True, help="merge concurrent requests into one forward pass "
                                     "(false = one request per forward)")
    max_batch_tokens: int = field(16384, help="max padded tokens (longest item x items) in one forward pass")
    max_batch_size: int = field(64, help="max items in one forward pass")
    max_wait_ms: float = field(5.0, help="how long the oldest queued item may wait for a fuller batch")
    max_queue: int = field(4096, help="max items waiting; beyond it requests get RESOURCE_EXHAUSTED")
    split_by_length: bool = field(True, help="run a batch as length-sorted sub-batches where the fitted "
                                             "cost model says that is faster than padding")

    def validate(self) -> None:
        from instructrl.config import ConfigError
        for name in ("max_batch_tokens", "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batching.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"batching.max_wait_ms: must be >= 0, got {self.max_wait_ms}")


@dataclasses.dataclass
class _Entry:
    item: Any
    length: int
    future: asyncio.Future
    request: int             # id of the submitting call (disabled mode batches per request)
    enqueued: float          # time.monotonic() at submit
    deadline: float | None   # time.monotonic() after which the item is dropped


class DynamicBatcher(Generic[T, R]):
    """Queues items from concurrent calls and runs `forward(list[T]) -> list[R]` on batches.

    Use `await start()`, then `await submit(items, lengths, timeout)` from any
    number of coroutines on the same event loop, and `await close()` at the end.
    """

    def __init__(self, forward: Callable[[list[T]], Sequence[R | Exception]], cfg: BatchingConfig,
                 service: str, thread_initializer: Callable[[], None] | None = None):
        self._forward = forward
        self.cfg = cfg
        self.service = service
        self._queue: collections.deque[_Entry] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{service}-forward", initializer=thread_initializer)
        self._requests = 0
        self._max_len = 0  # >= every queued length (reset when the queue empties)
        self._closed = False
        self._batch_size = BATCH_SIZE.labels(service)
        self._tokens = BATCH_TOKENS.labels(service)
        self._wait = BATCH_WAIT.labels(service)
        self.cost = CostModel()  # seconds of a forward pass vs its padded tokens
        self._overhead = BATCH_OVERHEAD.labels(service)
        self._overhead.set(math.nan)

    # ---- public API ---------------------------------------------------------------------------
    async def start(self) -> DynamicBatcher[T, R]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.service}-batcher")
        return self

    @property
    def queued(self) -> int:
        """Items waiting for a batch (cancelled ones included until they are skipped)."""
        return len(self._queue)

    async def submit(self, items: Sequence[T], lengths: Sequence[int], timeout: float | None = None) -> list[R]:
        """Queue `items` (with their token `lengths`) and return their results, in order.

        `timeout` (seconds, e.g. the RPC's remaining deadline) bounds the whole wait;
        items not started by then are dropped and `DeadlineExceeded` is raised.
        """
        if self._closed or self._task is None:
            raise Unavailable(f"{self.service}: batcher is not running")
        if len(items) != len(lengths):
            raise ValueError("items and lengths differ in length")
        if not items:
            return []
        if len(items) > self.cfg.max_queue:
            raise InvalidArgument(f"items: {len(items)} items in one request, more than the "
                                  f"queue holds ({self.cfg.max_queue}); split the request")
        if len(self._queue) + len(items) > self.cfg.max_queue:
            raise ResourceExhausted(f"{self.service}: {len(self._queue)} items queued "
                                    f"(max_queue {self.cfg.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = None if timeout is None else now + max(timeout, 0.0)
        self._requests += 1
        entries = [_Entry(it, int(n), loop.create_future(), self._requests, now, deadline)
                   for it, n in zip(items, lengths, strict=True)]
        was_empty = not self._queue
        self._queue.extend(entries)
        self._max_len = max(self._max_len, *lengths)
        if was_empty or self._maybe_full():  # otherwise the loop's max_wait timer wakes it
            self._wakeup.set()
        futures = [e.future for e in entries]
        try:
            done = asyncio.gather(*futures)
            if timeout is None:
                return list(await done)
            return list(await asyncio.wait_for(done, timeout=max(timeout, 0.0)))
        except TimeoutError:
            raise DeadlineExceeded(f"{self.service}: deadline of {timeout:.3f}s exceeded") from None
        finally:
            for f in futures:  # cancelled or failed call: items not yet started are skipped
                if not f.done():
                    f.cancel()

    async def close(self) -> None:
        """Stop taking batches: the running forward finishes and delivers, queued items get UNAVAILABLE."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self._queue:
            e = self._queue.popleft()
            if not e.future.done():
                e.future.set_exception(Unavailable(f"{self.service}: shutting down"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    # ---- the batching loop --------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            now = time.monotonic()
            self._drop_dead(now)
            if not self._queue:
                await self._sleep(None)  # until the next submit
                continue
            if self.cfg.enabled and not self._full():
                left = self._queue[0].enqueued + self.cfg.max_wait_ms / 1000.0 - now
                if left > 0:  # wait for a fuller batch, then look again
                    await self._sleep(left)
                    continue
            batch = self._take_batch()
            if not batch:
                continue
            now = time.monotonic()
            for e in batch:
                self._wait.observe(now - e.enqueued)
            lengths = [e.length for e in batch]
            overhead = self.cost.overhead_tokens() if self.cfg.split_by_length else None
            for group in split_by_length(lengths, overhead):
                await self._run_pass(loop, [batch[i] for i in group])

    async def _run_pass(self, loop: asyncio.AbstractEventLoop, batch: list[_Entry]) -> None:
        """One forward pass over `batch`; delivers its results and feeds the cost model."""
        batch = [e for e in batch if not e.future.done()]  # callers gone while an earlier pass ran
        if not batch:
            return
        self._batch_size.observe(len(batch))
        self._tokens.inc(sum(e.length for e in batch))
        try:
            results, seconds = await loop.run_in_executor(self._executor, self._timed_forward,
                                                          [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"forward returned {len(results)} results for {len(batch)} items")
            self.cost.observe(len(batch) * max(e.length for e in batch), seconds)
            fitted = self.cost.overhead_tokens()
            self._overhead.set(math.nan if fitted is None else fitted)
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the pass
            log.exception("%s: forward of %d items failed", self.service, len(batch))
            results = [exc] * len(batch)
        for e, r in zip(batch, results, strict=True):
            if e.future.done():  # the caller gave up meanwhile
                continue
            if isinstance(r, BaseException):
                e.future.set_exception(r)
            else:
                e.future.set_result(r)

    def _timed_forward(self, items: list) -> tuple[Sequence, float]:
        """Runs on the forward thread: the results and the pass's own seconds."""
        t0 = time.perf_counter()
        results = self._forward(items)
        return results, time.perf_counter() - t0

    async def _sleep(self, timeout: float | None) -> None:
        """Until `submit` or `close` wakes the loop, or `timeout` seconds pass."""
        self._wakeup.clear()
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            if timer is not None:
                timer.cancel()

    def _maybe_full(self) -> bool:
        """Cheap upper bound of `_full()` (it may say yes wrongly, never no wrongly)."""
        n = len(self._queue)
        return n >= self.cfg.max_batch_size or self._max_len * n >= self.cfg.max_batch_tokens

    def _full(self) -> bool:
        """Would the head of the queue fill a batch (by items or padded tokens)?"""
        cfg = self.cfg
        count, longest = 0, 0
        for e in self._queue:
            if e.future.done():
                continue
            longest = max(longest, e.length)
            count += 1
            if count >= cfg.max_batch_size or longest * count >= cfg.max_batch_tokens:
                return True
        return False

    def _take_batch(self) -> list[_Entry]:
        """Pop live items from the head, within the padded-token and item limits.

        Disabled batching also stops at the first item of another request.
        """
        cfg = self.cfg
        batch: list[_Entry] = []
        longest = 0
        while self._queue:
            e = self._queue[0]
            if e.future.done():
                self._queue.popleft()
                continue
            if batch and ((not cfg.enabled and e.request != batch[0].request)
                          or len(batch) + 1 > cfg.max_batch_size
                          or max(longest, e.length) * (len(batch) + 1) > cfg.max_batch_tokens):
                break
            # the first item always goes in, even one longer than max_batch_tokens
            batch.append(self._queue.popleft())
            longest = max(longest, e.length)
        return batch

    def _drop_dead(self, now: float) -> None:
        """Fail items past their deadline; forget items whose caller is gone."""
        for e in self._queue:
            if not e.future.done() and e.deadline is not None and now >= e.deadline:
                e.future.set_exception(DeadlineExceeded(f"{self.service}: deadline passed while queued"))
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            self._max_len = 0


def torch_threads(n: int):
    """An initializer setting torch's intra-op threads to `n` (0 = torch's default), for the
    batcher's forward thread and the process that loads the model."""
    def init() -> None:
        import torch
        if n > 0:
            torch.set_num_threads(n)
    return init
