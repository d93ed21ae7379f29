"""Reward scoring throughput: server-side dynamic batching on vs off, 32 concurrent clients.

    python bench/scoring.py [--clients 32] [--requests 20] [--rounds 3] [--threads 1] [--hidden 32]
                            [--device cuda] [--no-split]

Builds a tiny reward model in a temporary directory and starts the real service
twice (`python -m instructrl.cli serve reward`, separate processes): one with
dynamic batching, one with `batching.enabled=false` (one request per forward
pass). Then, in alternating rounds so that both modes see the same machine load,
32 clients each send `--requests` single-item requests one after another over
their own channel (a closed loop) to one server. Throughput is the median over
rounds; p50/p99 are over every timed request of the mode. Prints a line per mode
and, last, a JSON line:

    {"batched_items_per_s": ..., "unbatched_items_per_s": ..., "speedup": ...,
     "p50_ms": ..., "p99_ms": ..., ...}

p50/p99 are the batched mode's latencies (unbatched_p50_ms/unbatched_p99_ms the other's).

What the ratio measures: batching removes the per-forward-pass overhead (Python,
kernel launches) that every single-item forward pays. With one CPU thread a wide
model is compute-bound and the ratio falls towards 1 (`--hidden 128` gives about
1.5x here); on a GPU, a forward of 32 short items costs about as much as one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
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
from instructrl.serving.client import ClientConfig, wait_healthy

MODES = {"batched": True, "unbatched": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workload(clients: int, requests: int, vocab: int, rng: random.Random):
    """Per client, `requests` (prompt, response) pairs of token ids: prompts 16-64, responses 8-32."""
    return [[([rng.randrange(3, vocab) for _ in range(rng.randint(16, 64))],
              [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]) for _ in range(requests)]
            for _ in range(clients)]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _server_metrics(metrics_port: int) -> dict[str, float]:
    """The server's batch-size histogram sum and count and its fitted per-pass overhead (tokens)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    vals = {}
    for line in text.splitlines():
        for name in ("instructrl_batch_size_sum", "instructrl_batch_size_count", "instructrl_batch_overhead_tokens"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals


def _batch_stats(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the server's instructrl_batch_size histogram."""
    vals = _server_metrics(metrics_port)
    return vals.get("instructrl_batch_size_sum", 0.0), vals.get("instructrl_batch_size_count", 0.0)


async def _round(clients: list[RewardClient], work, latencies: list[float] | None) -> float:
    """Every client sends its requests one after another; returns the wall time of the round."""
    async def run(c: RewardClient, reqs) -> None:
        for item in reqs:
            t0 = time.perf_counter()
            await c.score([item])
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*[run(c, reqs) for c, reqs in zip(clients, work, strict=True)])
    return time.perf_counter() - t0


async def _bench(ports: dict[str, tuple[int, int]], vocab: int, args) -> dict[str, dict]:
    rng = random.Random(0)
    clients = {m: [RewardClient(ClientConfig(address=f"127.0.0.1:{p}", timeout_s=120))
                   for _ in range(args.clients)] for m, (p, _) in ports.items()}
    for m in MODES:
        await wait_healthy(clients[m][0].channel, SERVICE_NAME, timeout_s=120)
        await _round(clients[m], _workload(args.clients, args.warmup, vocab, rng), None)  # connect, warm up
    out = {m: {"rates": [], "latencies": [], "batch_sum": 0.0, "batches": 0.0} for m in MODES}
    for r in range(args.rounds):
        work = _workload(args.clients, args.requests, vocab, rng)  # the same inputs for both modes
        order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
        for m in order:
            s0, n0 = _batch_stats(ports[m][1])
            seconds = await _round(clients[m], work, out[m]["latencies"])
            s1, n1 = _batch_stats(ports[m][1])
            out[m]["rates"].append(args.clients * args.requests / seconds)
            out[m]["batch_sum"] += s1 - s0
            out[m]["batches"] += n1 - n0
    for cs in clients.values():
        for c in cs:
            await c.close()
    for m in MODES:
        out[m]["overhead_tokens"] = _server_metrics(ports[m][1]).get("instructrl_batch_overhead_tokens", math.nan)
    return {m: {"overhead_tokens": o["overhead_tokens"], "items_per_s": statistics.median(o["rates"]),
                "rates": o["rates"],
                "p50_ms": 1000 * statistics.median(o["latencies"]),
                "p99_ms": 1000 * _percentile(o["latencies"], 99),
                "mean_batch_size": o["batch_sum"] / max(o["batches"], 1)} for m, o in out.items()}


def _start(model_dir: str, batching: bool, args) -> tuple[subprocess.Popen, int, int]:
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "instructrl.cli", "serve", "reward", f"model={model_dir}",
           f"server.port={port}", f"server.metrics_port={metrics_port}", f"torch_threads={args.threads}",
           f"batching.enabled={str(batching).lower()}", f"batching.max_wait_ms={args.max_wait_ms}",
           f"batching.max_batch_size={args.max_batch_size}", f"device={args.device}",
           f"batching.split_by_length={str(not args.no_split).lower()}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port, metrics_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="timed single-item requests per client per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per client first")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32, help="width of the tiny reward model (32, 64, 128, ...)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device of both servers (cpu, cuda)")
    p.add_argument("--no-split", action="store_true", help="turn off padding-aware sub-batches")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_scoring_") as tmp:
        tiny = TinyModelConfig(hidden_size=args.hidden, num_heads=max(1, args.hidden // 32),
                               num_layers=args.layers)
        _, tokenizer = build_tiny_reward_model(tmp, tiny)
        procs, ports = [], {}
        try:
            for m, on in MODES.items():
                proc, port, metrics_port = _start(tmp, on, args)
                procs.append(proc)
                ports[m] = (port, metrics_port)
            res = asyncio.run(_bench(ports, len(tokenizer), args))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for m, r in res.items():
        print(f"{m:>9}: {r['items_per_s']:8.1f} items/s (rounds: {', '.join(f'{x:.0f}' for x in r['rates'])})  "
              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  mean batch {r['mean_batch_size']:5.1f}",
              flush=True)
    b, u = res["batched"], res["unbatched"]
    print(json.dumps({
        "batched_items_per_s": round(b["items_per_s"], 1),
        "unbatched_items_per_s": round(u["items_per_s"], 1),
        "speedup": round(b["items_per_s"] / u["items_per_s"], 2),
        "p50_ms": round(b["p50_ms"], 2), "p99_ms": round(b["p99_ms"], 2),
        "unbatched_p50_ms": round(u["p50_ms"], 2), "unbatched_p99_ms": round(u["p99_ms"], 2),
        "mean_batch_size": round(b["mean_batch_size"], 1), "clients": args.clients,
        "fitted_overhead_tokens": None if math.isnan(b["overhead_tokens"]) else round(b["overhead_tokens"]),
        "split_by_length": not args.no_split, "device": args.device,
        "items_per_mode": args.clients * args.requests * args.rounds, "server_threads": args.threads,
        "hidden": args.hidden, "layers": args.layers,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
