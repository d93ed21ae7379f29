"""Crash tests: a consumer SIGKILLed mid-batch, and Redis killed and restarted with AOF."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from buffer_records import make_experience

from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig
from instructrl.v1.experience_pb2 import Experience

WORKER = str(Path(__file__).with_name("buffer_worker.py"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def spawn(*args):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_10k_records_4_producers_2_consumers_one_sigkilled_each_trained_once(redis_url, run_id):
    n, producers, repeat = 10_000, 4, 100
    procs = []
    try:
        survivor = spawn("consume", redis_url, run_id, "c0", n)
        victim = spawn("consume", redis_url, run_id, "c1", n, "--stall-after", 20)
        procs += [survivor, victim]
        per = n // producers
        prods = [spawn("produce", redis_url, run_id, k * per, per, repeat) for k in range(producers)]
        procs += prods

        buf = ExperienceBuffer(BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id))
        prefix = buf.keys.prefix
        deadline = time.monotonic() + 60
        while buf.r.get(f"{prefix}:test:stalled") != b"c1":
            assert time.monotonic() < deadline and victim.poll() is None, victim.stderr.read()
            time.sleep(0.01)
        held = buf.r.xpending_range(buf.keys.experience, "learner", "-", "+", 1000, "c1")
        assert held, "the victim must die holding an unacked batch"
        held_ids = [Experience.FromString(buf.r.xrange(
            buf.keys.experience, h["message_id"], h["message_id"])[0][1][b"r"]).sample_id for h in held]
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL

        for p in prods:
            assert p.wait(60) == 0, p.stderr.read()
        buf.r.set(f"{prefix}:test:producers_done", 1)
        out, err = survivor.communicate(timeout=60)
        assert survivor.returncode == 0, err
        stats = json.loads(out.strip().splitlines()[-1])

        expected = {f"p{i}/e0/s0" for i in range(n)}
        trained = [s.decode() for s in buf.r.lrange(f"{prefix}:test:trained", 0, -1)]
        assert len(trained) == n and set(trained) == expected  # every sample exactly once
        assert buf.r.hlen(buf.keys.seen) == n
        by_victim = sum(1 for v in buf.r.hvals(buf.keys.seen) if v.startswith(b"c1|"))
        assert by_victim > 0 and stats["committed"] == n - by_victim
        # the batch the victim died with was reclaimed and trained by the survivor
        assert all(buf.r.hget(buf.keys.seen, s).startswith(b"c0|") for s in held_ids)
        assert stats["reclaimed"] >= len(held) and stats["lost"] == 0
        assert stats["duplicates"] >= 1  # producer repeats were filtered out before training
        assert buf.depth() == 0
        assert not buf.r.xpending_range(buf.keys.experience, "learner", "-", "+", 10)
        buf.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
            for f in (p.stdout, p.stderr):
                f.close()


def test_redis_killed_and_restarted_with_aof_loses_nothing_unacked(aof_redis, run_id):
    cfg = BufferConfig(redis=RedisConfig(url=aof_redis.url, retry_attempts=30, retry_cap_s=0.5),
                       run_id=run_id, claim_idle_ms=200)
    buf = ExperienceBuffer.open(cfg)
    ids = [f"p{i}/e0/s0" for i in range(1000)]
    buf.put([make_experience(s) for s in ids])
    acked = []
    for _ in range(3):
        batch = buf.get(100, "c0")
        assert buf.ack(batch) == [True] * 100
        acked += batch.sample_ids
    in_flight = buf.get(100, "c0").sample_ids  # delivered, not acked when Redis dies

    aof_redis.kill()  # SIGKILL: only what appendfsync=always wrote survives
    restart = threading.Timer(0.5, aof_redis.start)
    restart.start()
    try:
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 700 and time.monotonic() < deadline:
            batch = buf.get(128, "c1", block_ms=100)  # reconnects with backoff
            assert buf.ack(batch) == [True] * len(batch)
            got += batch.sample_ids
    finally:
        restart.join()
    assert not set(got) & set(acked)  # nothing acked is redelivered
    assert sorted(got) == sorted(set(ids) - set(acked))  # nothing unacked is lost
    assert set(in_flight) <= set(got)
    assert buf.r.hlen(buf.keys.seen) == 1000 and buf.depth() == 0
    buf.close()
