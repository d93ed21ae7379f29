"""The whole RLHF loop's speed: the services vs one process, strict on-policy vs asynchronous.

One run, the same models (the demo's sizes: a 4-layer, 128-wide tiny Llama policy and a reward
model of its size, built here), the same PPO settings, prompts, cores and threads for every
variant, measured one after the other:

  inprocess: `bench/loop_inprocess.py`: one process doing an iteration's work in sequence:
             in-process vLLM `LLM`, reward-model scoring, reference log-probs, the learner's
             DeepSpeed PPO update, weights loaded into vLLM in place;
  strict:    `instructrl launch` (Redis, reward, reference, vLLM rollout, rollout worker,
             DeepSpeed learner as processes) with `pacing.max_policy_lag` 0: nothing is
             generated before the weights it needs are synced, so both sides are sequential;
  async:     the same launch with `max_policy_lag` 2: generation overlaps training.

Each variant runs `--warmup` + `--iterations` iterations (the services one more, unmeasured: the
last iteration writes the final checkpoint); samples/s is trained samples over the wall time of
the measured iterations, read from the learner's JSONL (`samples_trained`, `time`). From the
async run's JSONL: the learner's idle fraction (its `read` phase, waiting for a batch, over the
iteration's wall time), the weight-sync share (`sync` phase over wall time) and the wasted
generation (records dropped as stale or duplicate over those read).

Every compute process gets `--threads` threads (OMP/MKL/torch; vLLM's thread binding off), and
every process of the run is confined to `--cores` (default: all of this process's cores).
The last line printed is JSON; targets: service_tax_ratio >= 0.8, async_speedup_ratio >= 1.3
(2 cores), learner_idle_fraction <= 0.10, sync_share <= 0.05, wasted_fraction <= 0.05.

  python bench/loop.py [--iterations 8] [--warmup 2] [--out DIR] [--threads 1] [--cores 0,1]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
VARIANTS = ("inprocess", "strict", "async")
LAG = {"strict": 0, "async": 2}


def thread_env(threads: int) -> dict[str, str]:
    t = str(threads)
    return {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t, "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def build_models(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The demo's policy (instructrl.demo DemoConfig.model) and a reward model initialised from it."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    from instructrl.demo.main import DemoConfig
    from instructrl.demo.task import tokenizer_corpus
    from instructrl.models.tiny import build_tiny_llama, build_tokenizer

    transformers.logging.set_verbosity_error()
    cfg = DemoConfig().model
    policy, rm = out / "policy", out / "rm"
    tok = build_tokenizer(tokenizer_corpus(), cfg.vocab_size, out / "tokenizer")
    build_tiny_llama(policy, cfg, tokenizer=tok)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.normal_(0.0, cfg.hidden_size ** -0.5)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(rm, safe_serialization=True)
    tok.save_pretrained(rm)
    return policy, rm


def write_prompts(path: pathlib.Path, n: int) -> pathlib.Path:
    from instructrl.demo.task import answer, make_prompts

    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": answer(p)}}) + "\n"
                            for i, p in enumerate(make_prompts(n, seed=3))))
    return path


def launch_spec(args, out: pathlib.Path, policy: pathlib.Path, rm: pathlib.Path, prompts: pathlib.Path) -> dict:
    """The demo's PPO settings (instructrl.demo.main.launch_config) at the bench's length."""
    t = args.threads
    return {
        "workdir": str(out), "prompts": str(prompts), "epochs": 1, "stall_timeout_s": 600,
        "threads": {k: t for k in ("reward", "reference", "rollout", "worker", "learner")},
        "reward": {"model": str(rm), "torch_threads": t, "normalization": {"enabled": True, "freeze_after": 2000},
                   "batching": {"max_wait_ms": 5}},
        "reference": {"model": str(policy), "torch_threads": t, "batching": {"max_wait_ms": 5}},
        "rollout": {"engine": {"model": str(policy), "dtype": "float32", "max_model_len": 128,
                               "enforce_eager": True, "kv_cache_gb": 1, "seed": 0}},
        "worker": {"sampling": {"n": args.n, "temperature": 1.0, "max_tokens": args.max_tokens},
                   "claim_batch": args.batch // args.n},
        "learner": {
            "model": {"actor_path": str(policy), "critic_path": str(rm)},
            "ppo": {"batch_size": args.batch, "minibatch_size": args.batch // 2, "micro_batch_size": args.batch // 4,
                    "epochs": 2, "actor_lr": 5e-5, "critic_lr": 1e-4, "kl_coef": 0.05, "lam": 0.95, "gamma": 1.0,
                    "max_iterations": args.warmup + args.iterations, "seed": 0},
            "deepspeed": {"torch_threads": t},
            "sync": {"master_port": 0},
            "checkpoint": {"every": 1_000_000, "keep": 1, "save_hf": False},
        },
    }


def run_inprocess(spec: dict, out: pathlib.Path, env: dict[str, str]) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    with open(out / "inprocess.log", "wb") as log:
        r = subprocess.run([sys.executable, str(HERE / "loop_inprocess.py"), str(out / "spec.json"),
                            str(out / "result.json")], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = (out / "inprocess.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the in-process loop failed (exit {r.returncode}):\n{tail}")
    res = json.loads((out / "result.json").read_text())
    if max(it["logprob_max_abs_diff"] for it in res["iterations"]) > 1e-2:
        raise RuntimeError(f"vLLM's log-probs drift from the learner's: the in-process weight load failed? {res}")
    n = 0
    recs = []
    for it in res["iterations"]:  # as the learner's JSONL says it
        n += it["samples"]
        recs.append({"time": it["time"], "samples_trained": n, "stale_dropped": 0, "duplicates": 0,
                     "phase_seconds": it["phase_seconds"]})
    return recs


def run_services(spec: dict, lag: int, out: pathlib.Path, env: dict[str, str]) -> list[dict]:
    from instructrl.config import from_dict
    from instructrl.launcher.config import LaunchConfig
    from instructrl.launcher.run import launch

    spec = json.loads(json.dumps(spec))
    spec.update(workdir=str(out), run_id=f"bench-loop-{os.getpid()}-{lag}")
    spec["learner"]["pacing"] = {"max_policy_lag": lag}
    spec["learner"]["ppo"]["max_iterations"] += 1  # the last one checkpoints: not measured
    os.environ.update(env)  # the launcher hands its environment (plus its thread caps) to every process
    launch(from_dict(LaunchConfig, spec))
    jsonl = out / "checkpoints" / "metrics.jsonl"
    return [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]


def figures(recs: list[dict], warmup: int, iterations: int) -> dict:
    """samples/s and the shares of the measured iterations (records warmup .. warmup + iterations)."""
    first, window = recs[warmup - 1] if warmup else None, recs[warmup:warmup + iterations]
    t0 = first["time"] if first else window[0]["time"] - sum(window[0]["phase_seconds"].values())
    wall = window[-1]["time"] - t0
    trained = window[-1]["samples_trained"] - (first["samples_trained"] if first else 0)
    phase = {k: sum(r["phase_seconds"].get(k, 0.0) for r in window) for k in window[0]["phase_seconds"]}
    dropped = sum(window[-1][k] - (first[k] if first else 0) for k in ("stale_dropped", "duplicates"))
    return {"samples_per_s": trained / wall, "seconds_per_iteration": wall / len(window), "trained": trained,
            "phase_share": {k: v / wall for k, v in phase.items()}, "dropped": dropped,
            "wasted_fraction": dropped / (trained + dropped) if trained + dropped else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=8, help="measured iterations per variant")
    ap.add_argument("--warmup", type=int, default=2, help="iterations per variant before measuring")
    ap.add_argument("--out", type=pathlib.Path, help="keep models, logs and JSONL here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of every process (every variant)")
    ap.add_argument("--cores", default="", help="CPU ids every process runs on, e.g. 0,1 (default: all of ours)")
    ap.add_argument("--batch", type=int, default=64, help="ppo.batch_size (the demo's 64)")
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (the demo's 4)")
    ap.add_argument("--max-tokens", type=int, default=12, help="response length cap (the demo's 12)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.batch % (4 * args.n):
        ap.error("--iterations >= 1, --warmup >= 0, --batch a multiple of 4 * --n")
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})  # inherited by every child
    cores = sorted(os.sched_getaffinity(0))
    env = thread_env(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        out = (args.out or pathlib.Path(tmp)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        policy, rm = build_models(out / "models")
        per_run = (args.warmup + args.iterations + 4) * args.batch // args.n  # + lag and the final iteration
        spec = launch_spec(args, out, policy, rm, write_prompts(out / "prompts.jsonl", per_run))
        result: dict = {}
        for v in args.variants.split(","):
            t0 = time.monotonic()
            recs = (run_inprocess(spec, out / v, env) if v == "inprocess"
                    else run_services(spec, LAG[v], out / v, env))
            result[v] = {**figures(recs, args.warmup, args.iterations), "run_s": time.monotonic() - t0}
            print(f"{v}: {json.dumps(result[v])}", flush=True)
    print(json.dumps(summary(args, cores, result)))
    return 0


def summary(args, cores: list[int], r: dict) -> dict:
    rate = {v: r[v]["samples_per_s"] for v in r}
    ratio = lambda a, b: round(rate[a] / rate[b], 3) if a in rate and b in rate else None  # noqa: E731
    a = r.get("async", {})
    return {
        "bench": "loop", "cores": len(cores), "threads_per_process": args.threads, "batch": args.batch,
        "n": args.n, "max_tokens": args.max_tokens, "iterations": args.iterations, "warmup": args.warmup,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **{f"{v}_samples_per_s": round(x, 2) for v, x in rate.items()},
        "service_tax_ratio": ratio("strict", "inprocess"), "async_speedup_ratio": ratio("async", "strict"),
        "learner_idle_fraction": round(a["phase_share"].get("read", 0.0), 3) if a else None,
        "sync_share": round(a["phase_share"].get("sync", 0.0), 3) if a else None,
        "wasted_fraction": round(a["wasted_fraction"], 3) if a else None,
        "targets": {"service_tax_ratio": ">= 0.8", "async_speedup_ratio": ">= 1.3", "learner_idle_fraction": "<= 0.10",
                    "sync_share": "<= 0.05", "wasted_fraction": "<= 0.05"},
        "phase_share": {v: {k: round(x, 3) for k, x in r[v]["phase_share"].items()} for v in r},
        "seconds_per_iteration": {v: round(r[v]["seconds_per_iteration"], 3) for v in r},
        "run_s": {v: round(r[v]["run_s"], 1) for v in r},
    }


if __name__ == "__main__":
    sys.exit(main())
