"""DynamicBatcher: batch forming by padded tokens/items/wait, disabled mode, deadlines, queue bound."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from instructrl.serving.batcher import BatchingConfig, DynamicBatcher
from instructrl.serving.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable


class Recorder:
    """A forward that doubles its inputs and records every batch (and the thread it ran on)."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        return [2 * x for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_concurrent_requests_share_a_forward_and_keep_order():
    async def main():
        fwd = Recorder()
        b = await DynamicBatcher(fwd, BatchingConfig(max_wait_ms=50), "t").start()
        outs = await asyncio.gather(*[b.submit([10 * k, 10 * k + 1], [3, 3]) for k in range(8)])
        await b.close()
        assert outs == [[20 * k, 20 * k + 2] for k in range(8)]
        assert len(fwd.batches) == 1 and len(fwd.batches[0]) == 16
        assert len(fwd.threads) == 1 and next(iter(fwd.threads)).startswith("t-forward")
    run(main())


def test_padded_token_and_size_limits():
    async def main():
        fwd = Recorder()
        # padded tokens: longest x items <= 40; lengths 10,10,10,30 -> [10,10,10] (30) then [30] (30)
        b = await DynamicBatcher(fwd, BatchingConfig(max_batch_tokens=40, max_wait_ms=20), "t").start()
        await asyncio.gather(*[b.submit([x], [n]) for x, n in zip(range(4), (10, 10, 10, 30), strict=True)])
        assert fwd.batches == [[0, 1, 2], [3]]
        fwd.batches.clear()
        # an item longer than max_batch_tokens still runs, alone
        assert await b.submit([7], [100]) == [14]
        assert fwd.batches == [[7]]
        await b.close()

        fwd = Recorder()
        b = await DynamicBatcher(fwd, BatchingConfig(max_batch_size=3, max_wait_ms=20), "t").start()
        await b.submit(list(range(7)), [1] * 7)
        assert fwd.batches == [[0, 1, 2], [3, 4, 5], [6]]
        await b.close()
    run(main())


def test_full_batch_does_not_wait_and_lone_item_waits_max_wait():
    async def main():
        b = await DynamicBatcher(Recorder(), BatchingConfig(max_batch_size=4, max_wait_ms=2000), "t").start()
        t0 = time.monotonic()
        await b.submit([1, 2, 3, 4], [1] * 4)
        assert time.monotonic() - t0 < 1.0  # full at once
        await b.close()
        b = await DynamicBatcher(Recorder(), BatchingConfig(max_wait_ms=150), "t").start()
        t0 = time.monotonic()
        await b.submit([1], [1])
        assert 0.14 <= time.monotonic() - t0 < 1.5
        await b.close()
    run(main())


def test_items_queue_while_forward_runs():
    async def main():
        gate = threading.Event()
        fwd = Recorder(gate=gate)
        b = await DynamicBatcher(fwd, BatchingConfig(max_wait_ms=0), "t").start()
        first = asyncio.ensure_future(b.submit([0], [1]))
        await asyncio.sleep(0.05)  # the first forward is now blocked on the gate
        rest = [asyncio.ensure_future(b.submit([k], [1])) for k in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *rest)
        assert fwd.batches == [[0], [1, 2, 3, 4, 5]]
        await b.close()
    run(main())


def test_disabled_runs_each_request_alone():
    async def main():
        fwd = Recorder()
        b = await DynamicBatcher(fwd, BatchingConfig(enabled=False, max_wait_ms=1000), "t").start()
        t0 = time.monotonic()
        outs = await asyncio.gather(b.submit([1, 2], [1, 1]), b.submit([3], [1]), b.submit([4], [1]))
        assert time.monotonic() - t0 < 0.9  # no waiting
        assert outs == [[2, 4], [6], [8]]
        assert sorted(fwd.batches) == [[1, 2], [3], [4]]
        await b.close()
    run(main())


def test_deadline_and_cancellation_drop_items_before_the_forward():
    async def main():
        gate = threading.Event()
        fwd = Recorder(gate=gate)
        b = await DynamicBatcher(fwd, BatchingConfig(max_wait_ms=0), "t").start()
        blocker = asyncio.ensure_future(b.submit([0], [1]))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await b.submit([1], [1], timeout=0.05)
        cancelled = asyncio.ensure_future(b.submit([2], [1]))
        await asyncio.sleep(0.02)
        cancelled.cancel()
        alive = asyncio.ensure_future(b.submit([3], [1], timeout=10))
        await asyncio.sleep(0.02)
        gate.set()
        assert await blocker == [0] and await alive == [6]
        assert fwd.batches == [[0], [3]]  # 1 (deadline) and 2 (cancelled) never ran
        assert b.queued == 0
        await b.close()
    run(main())


def test_bounded_queue_and_errors():
    async def main():
        gate = threading.Event()
        b = await DynamicBatcher(Recorder(gate=gate), BatchingConfig(max_queue=4, max_wait_ms=0), "t").start()
        running = asyncio.ensure_future(b.submit([0], [1]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit([1, 2, 3], [1, 1, 1]))
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceExhausted):
            await b.submit([4, 5], [1, 1])
        with pytest.raises(InvalidArgument):
            await b.submit(list(range(5)), [1] * 5)  # could never fit
        gate.set()
        assert await running == [0] and await queued == [2, 4, 6]
        assert await b.submit([4, 5], [1, 1]) == [8, 10]  # room again
        await b.close()
        with pytest.raises(Unavailable):
            await b.submit([1], [1])
    run(main())


def test_per_item_exceptions_and_failing_forward():
    def forward(items):
        if -1 in items:
            raise RuntimeError("boom")
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main():
        b = await DynamicBatcher(forward, BatchingConfig(enabled=False), "t").start()
        assert await b.submit([1, 2], [1, 1]) == [1, 2]
        with pytest.raises(ValueError, match="bad -2"):
            await b.submit([3, -2], [1, 1])
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit([-1], [1])
        assert await b.submit([5], [1]) == [5]  # still serving
        await b.close()
    run(main())


def test_close_lets_the_running_forward_deliver_and_fails_queued_items():
    async def main():
        gate = threading.Event()
        fwd = Recorder(gate=gate)
        b = await DynamicBatcher(fwd, BatchingConfig(max_wait_ms=0), "t").start()
        running = asyncio.ensure_future(b.submit([0], [1]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit([1], [1]))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        gate.set()
        await closing
        with pytest.raises(Unavailable):
            await queued
        assert await running == [0]  # the running forward finished and delivered
        assert fwd.batches == [[0]]
    run(main())
