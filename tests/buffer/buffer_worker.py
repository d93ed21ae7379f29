"""Producer / consumer processes for the crash test (run as scripts, killed for real).

  python buffer_worker.py produce URL RUN_ID START COUNT [REPEAT]
  python buffer_worker.py consume URL RUN_ID NAME EXPECT [--stall-after K]

A consumer "trains" on a batch (sleeps), then commits it with `ack`, whose `extra`
appends the batch's sample_ids to the list `trained` in the same MULTI/EXEC: a sample
counts as trained exactly when its commit is durable. With --stall-after K it reads a
K+1-th batch, publishes `stalled`, and waits to be SIGKILLed holding it. Consumers stop
when the test has set `producers_done`, the stream is empty and EXPECT samples are used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from buffer_records import make_experience  # noqa: E402

from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig  # noqa: E402


def config(url: str, run_id: str) -> BufferConfig:
    return BufferConfig(redis=RedisConfig(url=url), run_id=run_id, capacity=1000,
                        claim_idle_ms=1000, put_timeout_s=60, block_ms=100)


def produce(a) -> None:
    buf = ExperienceBuffer.open(config(a.url, a.run_id))
    ids = [f"p{i}/e0/s0" for i in range(a.start, a.start + a.count)]
    for i in range(0, len(ids), 50):
        buf.put([make_experience(s, seed=hash(s) % 1000) for s in ids[i:i + 50]])
    # a replica that died after writing but before acking its prompts: the same samples again
    buf.put([make_experience(s, seed=1) for s in ids[:a.repeat]])
    buf.close()


def consume(a) -> None:
    buf = ExperienceBuffer.open(config(a.url, a.run_id))
    trained = f"{buf.keys.prefix}:test:trained"
    stats = {"batches": 0, "committed": 0, "lost": 0, "reclaimed": 0, "duplicates": 0}
    deadline = time.monotonic() + 90
    finished = f"{buf.keys.prefix}:test:producers_done"
    while time.monotonic() < deadline and not (
            buf.r.exists(finished) and buf.depth() == 0 and buf.r.hlen(buf.keys.seen) >= a.expect):
        batch = buf.get(64, a.name)
        stats["reclaimed"] += batch.reclaimed
        stats["duplicates"] += batch.duplicates
        if not batch:
            continue
        if a.stall_after is not None and stats["batches"] >= a.stall_after:
            buf.r.set(f"{buf.keys.prefix}:test:stalled", a.name)
            time.sleep(3600)  # mid-batch: read, not acked; the test SIGKILLs us here
        time.sleep(0.005)  # "training"
        ids = batch.sample_ids
        flags = buf.ack(batch, tag=f"b{stats['batches']}",
                        extra=lambda pipe, ids=ids: pipe.rpush(trained, *ids))
        stats["batches"] += 1
        stats["committed"] += sum(flags)
        stats["lost"] += flags.count(False)
    print(json.dumps(stats), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("produce")
    pp.add_argument("url"), pp.add_argument("run_id")
    pp.add_argument("start", type=int), pp.add_argument("count", type=int)
    pp.add_argument("repeat", type=int, nargs="?", default=0)
    pc = sub.add_parser("consume")
    pc.add_argument("url"), pc.add_argument("run_id"), pc.add_argument("name")
    pc.add_argument("expect", type=int)
    pc.add_argument("--stall-after", type=int, default=None)
    a = p.parse_args()
    produce(a) if a.cmd == "produce" else consume(a)


if __name__ == "__main__":
    main()
