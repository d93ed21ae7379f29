"""`instructrl demo`: the InstructGPT recipe end to end on a synthetic task, on one machine.

1. data: demonstrations, K-wise rankings from noisy labelers, PPO prompts, held-out prompts;
2. a BPE tokenizer and tiny Llama models built locally (the policy, and one 4x its size);
3. SFT of both (`instructrl sft`), then the reward model from the small SFT (`instructrl rm`);
4. PPO through the real services (`instructrl launch`: Redis, reward, reference, vLLM rollout,
   rollout worker, DeepSpeed learner), with weights broadcast to the rollout each iteration;
5. held-out evaluation of SFT, PPO (and its checkpoints), and the 4x SFT model by the labeler;
6. runs/demo/report.md with plots.
Every stage runs as its own process, as it would on a cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import yaml

from instructrl.config import ConfigError, apply_overrides, field, from_dict, help_lines
from instructrl.demo import task as T
from instructrl.models.tiny import TinyModelConfig

log = logging.getLogger("instructrl.demo")


@dataclasses.dataclass
class DemoSizes:
    demonstrations: int = field(4000, help="SFT demonstrations")
    rankings: int = field(8000, help="prompts ranked by labelers for the RM (K responses each)")
    rm_eval_rankings: int = field(300, help="held-out rankings for the RM's accuracy")
    ppo_prompts: int = field(3000, help="distinct prompts on the PPO prompt stream")
    eval_prompts: int = field(1000, help="held-out prompts for the final evaluation")
    ppo_iterations: int = field(250, help="PPO iterations (policy versions)")
    curve_every: int = field(50, help="evaluate a PPO checkpoint every this many iterations (overoptimization curve)")
    RENAMED: ClassVar[dict[str, str]] = {"ppo_steps": "sizes.ppo_iterations"}


@dataclasses.dataclass
class DemoConfig:
    workdir: str = field("runs/demo", help="where data, models, logs and report.md go")
    seed: int = field(0, help="seed of data, models and training")
    sizes: DemoSizes = field(default_factory=DemoSizes, help="how much of everything")
    task: T.TaskConfig = field(default_factory=T.TaskConfig, help="the synthetic task and its labelers")
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(hidden_size=128, num_layers=4, num_heads=2),
                                   help="the policy's architecture")
    big_model: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(hidden_size=256, num_layers=4, num_heads=4),
        help="the SFT-only baseline, ~4x the policy's parameters")
    big_baseline: bool = field(True, help="train and judge the 4x SFT-only baseline")
    sft: dict[str, Any] = field(
        default_factory=lambda: {"train": {"max_steps": 1500, "micro_batch_size": 32},
                                 "optim": {"lr": 1e-3, "warmup_steps": 50}},
        help="`instructrl sft` fields (measured: the stage defaults underfit this task)")
    rm: dict[str, Any] = field(
        default_factory=lambda: {"train": {"epochs": 1, "micro_batch_size": 16},
                                 "optim": {"lr": 3e-4, "warmup_steps": 20}},
        help="`instructrl rm` fields")
    launch: dict[str, Any] = field(default_factory=dict, help="extra `instructrl launch` fields (learner.ppo.*, ...)")
    max_new_tokens: int = field(12, help="response length cap (tokens) for rollouts and evaluation")


QUICK = [  # a shortened run: CI's end-to-end test and `--quick`
    "sizes.demonstrations=1500", "sizes.rankings=600", "sizes.rm_eval_rankings=100", "sizes.ppo_prompts=400",
    "sizes.eval_prompts=100", "sizes.ppo_iterations=4", "sizes.curve_every=2", "big_baseline=false",
    "sft.train.max_steps=150", "model.num_layers=2",
]


def _run(stage: str, argv: list[str], logdir: pathlib.Path, threads: int = 1,
         echo: Callable[[str], None] | None = None, echo_every_s: float = 10.0) -> float:
    """Run one stage as its own process; raise naming the stage and its log on failure.

    `echo` is given the stage's progress lines (`sft step 20/150 train: loss ...`, every eval
    line, and the last line), at most one train line every `echo_every_s` seconds.
    """
    t0 = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    logf = logdir / f"{stage}.log"
    with open(logf, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", *argv], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, stdin=subprocess.DEVNULL)
    follow = _StageProgress(logf, echo, echo_every_s)
    try:
        while proc.poll() is None:
            follow.poll()
            time.sleep(0.5)
    finally:
        if proc.poll() is None:  # interrupted: the stage goes too
            proc.terminate()
            proc.wait(30)
    follow.poll(final=True)
    if proc.returncode != 0:
        tail = "\n".join(logf.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); see {logf}:\n{tail}")
    return time.monotonic() - t0


class _StageProgress:
    """Picks the progress lines (`<name> step N/M train|eval: ...`) out of a stage's growing log."""

    PATTERN = re.compile(r"^(sft|rm|dpo) step \d+/\d+ (train|eval): ")

    def __init__(self, log: pathlib.Path, echo: Callable[[str], None] | None, every_s: float):
        self.log, self.echo, self.every_s = log, echo, every_s
        self.offset, self.shown, self.pending = 0, 0.0, ""

    def poll(self, final: bool = False) -> None:
        if self.echo is None:
            return
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if not self.PATTERN.match(line):
                continue
            if " eval: " in line or time.monotonic() - self.shown >= self.every_s:
                self.echo(line)
                self.shown, self.pending = time.monotonic(), ""
            else:
                self.pending = line
        if final and self.pending:
            self.echo(self.pending)
            self.pending = ""


def _last_jsonl(path: pathlib.Path, kind: str | None = None) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    if kind:
        recs = [r for r in recs if r.get("kind") == kind or r.get("split") == kind] or recs
    return recs[-1] if recs else {}


def _params(model_dir: pathlib.Path) -> str:
    from safetensors import safe_open
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return f"{n / 1e6:.2f}M"


def make_data(cfg: DemoConfig, data: pathlib.Path) -> dict[str, pathlib.Path]:
    s, tc = cfg.sizes, cfg.task
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "sft": T.write_jsonl(data / "demonstrations.jsonl", T.make_demonstrations(s.demonstrations, cfg.seed, tc)),
        "rm": T.write_jsonl(data / "rankings.jsonl", T.make_rankings(s.rankings, cfg.seed + 1, tc)),
        "rm_eval": T.write_jsonl(data / "rankings_eval.jsonl",
                                 T.make_rankings(s.rm_eval_rankings, cfg.seed + 2, tc, split="eval")),
    }
    prompts = T.make_prompts(s.ppo_prompts, cfg.seed + 3, tc)
    files["prompts"] = T.write_jsonl(data / "ppo_prompts.jsonl", [
        {"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": T.answer(p)}} for i, p in enumerate(prompts)])
    evalp = T.make_prompts(s.eval_prompts, cfg.seed + 4, tc, split="eval")
    files["eval"] = T.write_jsonl(data / "eval_prompts.jsonl", [{"prompt": p} for p in evalp])
    return files


def launch_config(cfg: DemoConfig, work: pathlib.Path, sft: pathlib.Path, rm: pathlib.Path,
                  prompts: pathlib.Path) -> dict:
    s = cfg.sizes
    batch, n = 64, 4
    base = {
        "run_id": f"demo-{int(time.time())}",
        "workdir": str(work / "ppo"),
        "prompts": str(prompts),
        # enough prompts for every iteration (n samples each), with room for stale drops
        "epochs": max(1, -(-(s.ppo_iterations + 4) * batch * 2 // (n * max(s.ppo_prompts, 1)))),
        "reward": {"model": str(rm), "normalization": {"enabled": True, "freeze_after": 2000},
                   "batching": {"max_wait_ms": 5}},
        "reference": {"model": str(sft), "batching": {"max_wait_ms": 5}},
        "rollout": {"engine": {"model": str(sft), "dtype": "float32", "max_model_len": 128,
                               "enforce_eager": True, "kv_cache_gb": 1, "seed": cfg.seed}},
        # backpressure: the rollout may run at most two batches ahead of the learner
        "worker": {"sampling": {"n": n, "temperature": 1.0, "max_tokens": cfg.max_new_tokens},
                   "claim_batch": 16, "buffer": {"capacity": 2 * batch}},
        "learner": {
            "model": {"actor_path": str(sft), "critic_path": str(rm)},
            "ppo": {"batch_size": batch, "minibatch_size": 32, "micro_batch_size": 16, "epochs": 2,
                    "actor_lr": 5e-5, "critic_lr": 1e-4, "kl_coef": 0.05, "lam": 0.95, "gamma": 1.0,
                    "max_iterations": s.ppo_iterations, "seed": cfg.seed},
            # the rollout runs up to a few batches ahead (generation overlaps training); PPO's
            # ratio is taken against the learner's own recomputed log-probs
            "buffer": {"capacity": 2 * batch}, "pacing": {"max_policy_lag": 4},
            "checkpoint": {"every": s.curve_every, "keep": 1000, "save_hf": True},
        },
    }
    return _merge(base, cfg.launch)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(cfg: DemoConfig) -> pathlib.Path:
    from instructrl.demo import evaluate as E
    from instructrl.demo.report import read_jsonl, write_report
    from instructrl.launcher.config import LaunchConfig
    from instructrl.launcher.run import launch
    from instructrl.models.tiny import build_tiny_llama, build_tokenizer

    work = pathlib.Path(cfg.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    timings: dict[str, float] = {}
    t_all = time.monotonic()

    def stage(name: str) -> None:
        print(f"[demo {time.monotonic() - t_all:6.0f}s] {name}", flush=True)

    def step(line: str) -> None:  # a stage's progress line
        print(f"[demo {time.monotonic() - t_all:6.0f}s]   {line}", flush=True)

    stage("1/6 data: demonstrations, K-wise rankings, prompts")
    files = make_data(cfg, work / "data")
    agreement = T.labeler_agreement(2000, cfg.seed, cfg.task)

    stage("2/6 tokenizer and tiny models")
    tok = build_tokenizer(T.tokenizer_corpus(cfg.task), cfg.model.vocab_size, work / "models" / "tokenizer")
    build_tiny_llama(work / "models" / "base", cfg.model, tokenizer=tok)
    if cfg.big_baseline:
        build_tiny_llama(work / "models" / "base-4x", cfg.big_model, tokenizer=tok)

    stage("3/6 SFT (and the 4x SFT-only baseline), then the reward model")
    sft, rm = work / "models" / "sft", work / "models" / "rm"
    sft_args = ["sft", f"model={work / 'models' / 'base'}", f"output_dir={sft}", f"data.train_file={files['sft']}",
                f"train.seed={cfg.seed}", "train.progress=false"]
    sft_args += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in _flat(cfg.sft).items()]
    timings["sft"] = _run("sft", sft_args, logs, echo=step)
    if cfg.big_baseline:
        big = work / "models" / "sft-4x"
        big_args = [a.replace(str(work / "models" / "base"), str(work / "models" / "base-4x"))
                    .replace(f"output_dir={sft}", f"output_dir={big}") for a in sft_args]
        timings["sft_4x"] = _run("sft-4x", big_args, logs, echo=lambda x: step(x.replace("sft ", "sft-4x ", 1)))
    rm_args = ["rm", f"model={sft}", f"output_dir={rm}", f"data.train_file={files['rm']}",
               f"data.eval_file={files['rm_eval']}", f"data.demonstrations_file={files['sft']}",
               f"train.seed={cfg.seed}", "train.progress=false"]
    rm_args += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in _flat(cfg.rm).items()]
    timings["rm"] = _run("rm", rm_args, logs, echo=step)
    rm_final = _last_jsonl(rm / "metrics.jsonl", "eval")

    stage("4/6 PPO through the services (Redis, reward, reference, vLLM rollout, worker, DeepSpeed learner)")
    lc_dict = launch_config(cfg, work, sft, rm, files["prompts"])
    (work / "launch.yaml").write_text(yaml.safe_dump(lc_dict, sort_keys=False))
    t0 = time.monotonic()

    def progress(rec: dict) -> None:
        print(f"[demo {time.monotonic() - t_all:6.0f}s]   PPO v{rec.get('policy_version')}/{cfg.sizes.ppo_iterations}: "
              f"RM score {rec.get('score_mean', 0):+.3f}  KL {rec.get('kl_to_ref', 0):.3f}  "
              f"reward {rec.get('reward_mean', 0):+.3f}", flush=True)
    launch(from_dict(LaunchConfig, lc_dict), on_progress=progress)
    timings["ppo"] = time.monotonic() - t0

    stage("5/6 held-out evaluation by the labeler")
    t0 = time.monotonic()
    evalp = [json.loads(x)["prompt"] for x in files["eval"].read_text().splitlines()]
    ckdir = work / "ppo" / "checkpoints"
    hf_dirs = sorted(ckdir.glob("*/actor_hf"))
    if not hf_dirs:
        raise RuntimeError(f"the learner wrote no actor_hf checkpoint under {ckdir}")
    final_dir = hf_dirs[-1]
    models = {"SFT": sft, "PPO": final_dir}
    if cfg.big_baseline:
        models["SFT 4x"] = work / "models" / "sft-4x"
    ev = lambda name, d, temp: E.evaluate(name, d, evalp, rm, cfg.max_new_tokens,  # noqa: E731
                                          temperature=temp, seed=cfg.seed)
    res = {k: ev(k, d, 1.0) for k, d in models.items()}        # sampled, as the policy acts in PPO
    greedy = {k: ev(k, d, 0.0) for k, d in models.items()}
    log_recs = read_jsonl(ckdir / "metrics.jsonl")
    kl_at = {r["policy_version"]: r["kl_to_ref"] for r in log_recs}
    curve = [{"version": 0, "kl": 0.0, "proxy": res["SFT"].proxy_mean, "gold": res["SFT"].gold_mean}]
    for d in hf_dirs:
        v = _version_of(d)
        r = res["PPO"] if d == final_dir else ev(f"v{v}", d, 1.0)
        curve.append({"version": v, "kl": kl_at.get(v, float("nan")), "proxy": r.proxy_mean, "gold": r.gold_mean})
    timings["eval"] = time.monotonic() - t0

    stage("6/6 report")
    params = {"SFT": _params(sft), "PPO": _params(final_dir)}
    if cfg.big_baseline:
        params["SFT 4x"] = _params(work / "models" / "sft-4x")
    last = log_recs[-1] if log_recs else {}
    summary = {
        "tasks": cfg.task.tasks, "eval_prompts": len(evalp), "params": params,
        "gold": {k: v.gold_mean for k, v in res.items()}, "proxy": {k: v.proxy_mean for k, v in res.items()},
        "gold_greedy": {k: v.gold_mean for k, v in greedy.items()},
        "win_rate_ppo_vs_sft_greedy": E.win_rate(greedy["PPO"], greedy["SFT"]),
        "gold_by_task": {k: v.gold_by_task(evalp) for k, v in res.items()},
        "win_rate_ppo_vs_sft": E.win_rate(res["PPO"], res["SFT"]),
        "gold_diff_se": E.paired_se(res["PPO"], res["SFT"]),
        "gold_diff_se_greedy": E.paired_se(greedy["PPO"], greedy["SFT"]),
        "final_kl": last.get("kl_to_ref", float("nan")), "final_kl_coef": last.get("kl_coef", float("nan")),
        "rm_accuracy": {"held-out": rm_final.get("accuracy", rm_final.get("eval_accuracy", float("nan")))},
        "labeler_agreement": agreement, "ppo_iterations": cfg.sizes.ppo_iterations,
        "timings": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.monotonic() - t_all, 1)},
    }
    if cfg.big_baseline:
        summary["win_rate_ppo_vs_big"] = E.win_rate(res["PPO"], res["SFT 4x"])
        summary["win_rate_ppo_vs_big_greedy"] = E.win_rate(greedy["PPO"], greedy["SFT 4x"])
    examples = [(p, a, b, ga, gb) for p, a, b, ga, gb in zip(evalp, res["SFT"].responses, res["PPO"].responses,
                                                            res["SFT"].gold, res["PPO"].gold, strict=False)][:12]
    report = write_report(work, summary, log_recs, curve, examples)
    print(f"[demo {time.monotonic() - t_all:6.0f}s] done: {report}", flush=True)
    print(json.dumps({"gold_sft": summary["gold"]["SFT"], "gold_ppo": summary["gold"]["PPO"],
                      "gold_greedy_sft": summary["gold_greedy"]["SFT"],
                      "gold_greedy_ppo": summary["gold_greedy"]["PPO"],
                      "final_kl": summary["final_kl"], "rm_heldout_accuracy": summary["rm_accuracy"]["held-out"],
                      "total_s": summary["timings"]["total"]}))
    return report


def _version_of(hf_dir: pathlib.Path) -> int:
    digits = "".join(c for c in hf_dir.parent.name if c.isdigit())
    return int(digits) if digits else -1


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="instructrl demo", description=__doc__.splitlines()[0],
        epilog="config fields (key=value):\n  " + "\n  ".join(help_lines(DemoConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML file of DemoConfig")
    ap.add_argument("--quick", action="store_true", help="a shortened run (minutes): " + " ".join(QUICK))
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. sizes.ppo_iterations=10 workdir=/tmp/demo")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        data = yaml.safe_load(pathlib.Path(args.config).read_text()) if args.config else {}
        # start from the defaults so that `sft.train.max_steps=...` patches, not replaces, a section
        data = _merge(dataclasses.asdict(DemoConfig()), data or {})
        data = apply_overrides(data, (QUICK if args.quick else []) + args.overrides)
        cfg = from_dict(DemoConfig, data)
    except (ConfigError, ValueError, OSError) as e:
        print(f"instructrl demo: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("instructrl demo: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a failed stage: say which, where its log is
        print(f"instructrl demo: {e}", file=sys.stderr)
        return 1
    return 0
