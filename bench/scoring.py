"""Reward scoring throughput: server-side dynamic batching on vs off, 32 concurrent clients.

    python bench/scoring.py [--clients 32] [--requests 40] [--threads 1]

Builds a tiny reward model in a temporary directory, then for each mode starts
the real service (`python -m instructrl.cli serve reward`, a separate process)
and runs the same closed-loop load against it: every client sends single-item
requests one after another over its own channel. Prints one line per mode and,
last, a JSON line:

    {"batched_items_per_s": ..., "unbatched_items_per_s": ..., "speedup": ...,
     "p50_ms": ..., "p99_ms": ..., ...}

where p50/p99 are the batched run's request latencies (the unbatched ones are
reported as unbatched_p50_ms/unbatched_p99_ms).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from instructrl.models.tiny import TinyModelConfig
from instructrl.reward.client import RewardClient
from instructrl.reward.server import SERVICE_NAME
from instructrl.reward.tiny import build_tiny_reward_model
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(clients: int, requests: int, vocab: int, seed: int = 0):
    """Per client, `requests` single (prompt, response) pairs of token ids, prompts 16-64 tokens."""
    rng = random.Random(seed)
    return [[([rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))],
              [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]) for _ in range(requests)]
            for _ in range(clients)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def _load(addr: str, work, warmup: int) -> tuple[float, list[float]]:
    clients = [RewardClient(ClientConfig(address=addr, timeout_s=120)) for _ in work]
    await wait_healthy(clients[0].channel, SERVICE_NAME, timeout_s=120)
    for c, reqs in zip(clients, work):  # connect every channel, warm the model
        for item in reqs[:warmup]:
            await c.score([item])
    latencies: list[float] = []

    async def run(c: RewardClient, reqs) -> None:
        for item in reqs[warmup:]:
            t0 = time.perf_counter()
            await c.score([item])
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[run(c, reqs) for c, reqs in zip(clients, work)])
    elapsed = time.perf_counter() - t0
    for c in clients:
        await c.close()
    return elapsed, latencies


def _batch_stats(metrics_port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        for name in ("instructrl_batch_size_sum", "instructrl_batch_size_count"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals.get("instructrl_batch_size_sum", 0.0), vals.get("instructrl_batch_size_count", 0.0)


def run_mode(model_dir: str, batching: bool, work, args) -> dict:
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "instructrl.cli", "serve", "reward", f"model={model_dir}",
           f"server.port={port}", f"server.metrics_port={metrics_port}", f"torch_threads={args.threads}",
           f"batching.enabled={str(batching).lower()}", f"batching.max_wait_ms={args.max_wait_ms}",
           f"batching.max_batch_size={args.max_batch_size}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        elapsed, lat = asyncio.run(_load(f"127.0.0.1:{port}", work, args.warmup))
        s1, n1 = _batch_stats(metrics_port)  # warm-up batches included
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    items = len(lat)
    return {"items_per_s": items / elapsed, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * _percentile(lat, 99), "items": items, "seconds": elapsed,
            "mean_batch_size": s1 / n1 if n1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=40, help="timed single-item requests per client")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per client first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128, help="width of the tiny reward model")
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        tiny = TinyModelConfig(hidden_size=args.hidden, num_heads=max(1, args.hidden // 64),
                               num_layers=args.layers)
        _, tokenizer = build_tiny_reward_model(tmp, tiny)
        work = _workload(args.clients, args.warmup + args.requests, len(tokenizer))
        results = {}
        for mode, on in (("batched", True), ("unbatched", False)):
            r = run_mode(tmp, on, work, args)
            results[mode] = r
            print(f"{mode:>9}: {r['items_per_s']:8.1f} items/s  p50 {r['p50_ms']:7.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  mean batch {r['mean_batch_size']:5.1f}  "
                  f"({r['items']} items in {r['seconds']:.2f} s)", flush=True)
    b, u = results["batched"], results["unbatched"]
    print(json.dumps({
        "batched_items_per_s": round(b["items_per_s"], 2),
        "unbatched_items_per_s": round(u["items_per_s"], 2),
        "speedup": round(b["items_per_s"] / u["items_per_s"], 2),
        "p50_ms": round(b["p50_ms"], 2), "p99_ms": round(b["p99_ms"], 2),
        "unbatched_p50_ms": round(u["p50_ms"], 2), "unbatched_p99_ms": round(u["p99_ms"], 2),
        "clients": args.clients, "requests_per_client": args.requests, "server_threads": args.threads,
        "mean_batch_size": round(b["mean_batch_size"], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
