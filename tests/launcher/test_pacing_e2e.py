"""Pacing end to end, every role a real process (Redis, reward, reference, vLLM rollout, rollout
worker, DeepSpeed learner), on the failures users met:

- issue 16: default buffer and pacing settings and a rollout much faster than the learner.
  Before pacing, the rollout generated the whole prompt file within a minute, most of it was
  dropped as stale, the prompts ran out and the run died. Now it completes, stale drops stay
  under 5 %, and the rollout never starts more than the learner can train on.
- issue 13 bug 10: the rollout service SIGKILLed and restarted mid-run (back at policy_version 0),
  then the learner SIGKILLed and restarted (resuming from an older checkpoint, behind its
  replica). The run reaches its last iteration: the replica is caught up at once each time.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import redis
import yaml

from instructrl.buffer import BufferConfig, PromptQueue, RedisConfig
from instructrl.config import from_dict
from instructrl.launcher.config import LaunchConfig
from instructrl.launcher.procs import Supervisor, thread_env
from instructrl.launcher.progress import Console, snapshot
from instructrl.launcher.run import enqueue, launch, plan, read_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> pathlib.Path:
    from instructrl.demo.task import tokenizer_corpus
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    out = tmp_path_factory.mktemp("pacing") / "policy"
    build_tiny_llama(out, TinyModelConfig(hidden_size=64, num_heads=1, num_layers=1), tokenizer_corpus())
    return out


def _prompts(path: pathlib.Path, n: int) -> pathlib.Path:
    from instructrl.demo.task import answer, make_prompts
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": answer(p)}}) + "\n"
                            for i, p in enumerate(make_prompts(n, seed=0))))
    return path


def _launch_config(tmp: pathlib.Path, model: pathlib.Path, redis_url: str, run_id: str, *, prompts: int,
                   iterations: int, batch: int, learner: dict | None = None) -> LaunchConfig:
    return from_dict(LaunchConfig, {
        "run_id": run_id, "workdir": str(tmp / "run"), "redis_url": redis_url,
        "prompts": str(_prompts(tmp / "prompts.jsonl", prompts)), "stall_timeout_s": 240,
        "reward": {"rule": "instructrl.reward.rules:exact_match", "tokenizer": str(model)},
        "reference": {"model": str(model)},
        "rollout": {"engine": {"model": str(model), "dtype": "float32", "max_model_len": 128,
                               "enforce_eager": True, "kv_cache_gb": 1}},
        "worker": {"sampling": {"max_tokens": 8}},  # claim_batch, n, buffer: the defaults
        "learner": {"model": {"actor_path": str(model)},
                    "ppo": {"batch_size": batch, "minibatch_size": batch // 2, "micro_batch_size": batch // 4,
                            "epochs": 2, "max_iterations": iterations},
                    **(learner or {})},
    })


def test_a_fast_rollout_with_default_settings_stays_in_step(tmp_path, policy, redis_url, run_id):
    B, iterations, prompts = 32, 6, 400  # 1600 samples on offer, 192 to train
    cfg = _launch_config(tmp_path, policy, redis_url, run_id, prompts=prompts, iterations=iterations, batch=B)
    out = io.StringIO()
    console = Console(out, tty=False)  # what `instructrl launch` prints when stdout is not a terminal
    last = launch(cfg, on_status=lambda rec, st: console.update(snapshot(rec, st, iterations)) if rec else None)
    lines = [x for x in out.getvalue().splitlines() if x.startswith("iteration")]
    print(out.getvalue())
    assert [x.split(":")[0] for x in lines] == [f"iteration {v}/{iterations}" for v in range(1, iterations + 1)]
    assert all("samples/s" in x and "kl_coef" in x and "stale" in x for x in lines)
    assert any("buffer ?" not in x for x in lines)  # buffer depth from the learner's GetStatus
    assert "warning" not in out.getvalue()
    assert last["policy_version"] == iterations
    read = last["samples_trained"] + last["stale_dropped"]
    assert last["stale_dropped"] <= 0.05 * read, last
    with PromptQueue(BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id)) as q:
        started = prompts - q.depth()  # prompts claimed (or done) by the worker
    # at most (iterations + max_policy_lag + 1) * B samples admitted, in claims of whole prompts (n = 4)
    assert started * 4 <= (iterations + 1 + 1) * B, started


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _wait_version(path: pathlib.Path, version: int, timeout_s: float, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(r["policy_version"] >= version for r in _jsonl(path)):
        sup.check()
        assert time.monotonic() < deadline, f"no policy_version {version} within {timeout_s}s"
        time.sleep(0.05)  # a caught-up iteration takes a few tens of ms


def test_restarted_rollout_and_learner_do_not_stall_the_run(tmp_path, policy, redis_url, run_id):
    B, iterations = 16, 30  # room after v7: a caught-up iteration takes a few tens of ms
    cfg = _launch_config(tmp_path, policy, redis_url, run_id, prompts=200, iterations=iterations, batch=B,
                         learner={"checkpoint": {"every": 3, "save_hf": False}})
    configs, eps = plan(cfg, redis_url)
    work = pathlib.Path(cfg.workdir)
    (work / "configs").mkdir(parents=True)
    for name, section in configs.items():
        (work / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(section))
    jsonl = pathlib.Path(configs["learner"]["checkpoint"]["dir"]) / "metrics.jsonl"

    def start(sup: Supervisor, name: str, args: list[str], health: str | None):
        proc = sup.python(name, [*args, "--config", str(work / "configs" / f"{name}.yaml")], env=thread_env(1),
                          health_address=health)
        if health:
            sup.wait_healthy(proc, 300)
        return proc

    with Supervisor(work / "logs") as sup:
        start(sup, "reward", ["serve", "reward"], eps.reward)
        start(sup, "reference", ["serve", "reference"], eps.reference)
        learner = start(sup, "learner", ["serve", "learner"], eps.learner)
        rollout = start(sup, "rollout-0", ["serve", "rollout"], eps.rollouts[0])
        worker = start(sup, "worker-0", ["rollout-worker"], None)
        enqueue(redis_url, run_id, read_prompts(cfg.prompts), 1)

        _wait_version(jsonl, 4, 300, sup)
        os.killpg(rollout.popen.pid, signal.SIGKILL)  # back at v0 when it restarts
        rollout.popen.wait(10)
        sup.procs.remove(rollout)
        rollout = start(sup, "rollout-0", ["serve", "rollout"], eps.rollouts[0])
        _wait_version(jsonl, 7, 300, sup)
        # Freeze generation so the learner cannot finish before it is killed (once the replica is
        # caught up an iteration takes a fraction of a second): admission caps what it can still
        # train on at (version + max_policy_lag + 1) x B samples started, short of the last iteration.
        os.killpg(worker.popen.pid, signal.SIGSTOP)
        os.killpg(learner.popen.pid, signal.SIGKILL)  # resumes from an older checkpoint, behind its replica
        learner.popen.wait(10)
        first_process = _jsonl(jsonl)
        killed_at = max(r["policy_version"] for r in first_process)
        assert killed_at < iterations, f"the learner had finished (v{killed_at}) before it was killed"
        sup.procs.remove(learner)
        learner = start(sup, "learner", ["serve", "learner"], eps.learner)
        os.killpg(worker.popen.pid, signal.SIGCONT)
        deadline = time.monotonic() + 400
        while learner.alive():
            sup.check(exclude=("learner",))
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(1)
        assert learner.popen.returncode == 0, learner.log_tail()
    lines = _jsonl(jsonl)
    assert lines[-1]["policy_version"] == iterations
    # stale_dropped counts per learner process: the last line of each (the restart may resume
    # right at its last line's version, when that iteration was a checkpoint: count lines, not versions)
    assert len(lines) > len(first_process), "the restarted learner logged nothing"
    ends = [first_process[-1], lines[-1]]
    stale = sum(e["stale_dropped"] for e in ends)
    print(f"stale dropped: {stale} of {iterations * B} trained; per process {[e['stale_dropped'] for e in ends]}")
    r = redis.Redis.from_url(redis_url)
    try:
        dead = r.xlen(f"instructrl:{{{run_id}}}:dead")
    finally:
        r.close()
    assert dead == 0
    assert stale <= 2 * B  # drops happen around the restarts only, and are bounded


def _pid_of(config: pathlib.Path) -> int:
    """The process started with `--config <config>` (the launcher's child, its own process group)."""
    for d in pathlib.Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(config).encode() in (d / "cmdline").read_bytes().split(b"\0"):
                return int(d.name)
        except OSError:
            continue
    raise AssertionError(f"no process runs {config}")


@pytest.mark.parametrize("stop", ["ctrl-c", "rollout-dies"])
def test_an_interrupted_launch_keeps_what_it_trained(tmp_path, policy, run_id, stop):
    """issue 16: a run stopped early (Ctrl-C, or a process that dies) wrote no checkpoint of its
    iterations. Now the learner is stopped first, while Redis (the launcher's own, as by default)
    and the services still run, and checkpoints the last iteration it trained; the console showed
    a line per iteration and ends with a summary naming the final policy."""
    cfg = _launch_config(tmp_path, policy, "", run_id, prompts=200, iterations=50, batch=16,
                         learner={"checkpoint": {"every": 1000}})  # no regular checkpoint before the end
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    jsonl = pathlib.Path(cfg.workdir) / "checkpoints" / "metrics.jsonl"
    out = open(tmp_path / "launch.out", "w+")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", "launch", "--config", str(tmp_path / "run.yaml")],
                            stdout=out, stderr=subprocess.STDOUT, env=thread_env(1))
    try:
        deadline = time.monotonic() + 400
        while not any(r["policy_version"] >= 2 for r in _jsonl(jsonl)):
            assert proc.poll() is None, (tmp_path / "launch.out").read_text()
            assert time.monotonic() < deadline, "no policy_version 2 within 400 s"
            time.sleep(0.5)
        if stop == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            os.killpg(_pid_of(pathlib.Path(cfg.workdir).resolve() / "configs" / "rollout-0.yaml"), signal.SIGKILL)
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "launch.out").read_text()
    print(text)
    assert rc == (130 if stop == "ctrl-c" else 1)
    trained = _jsonl(jsonl)[-1]["policy_version"]
    assert 2 <= trained < 50
    ckpt = pathlib.Path(cfg.workdir) / "checkpoints" / f"iteration-{trained:08d}"
    assert json.loads((ckpt / "state.json").read_text())["policy_version"] == trained
    assert (ckpt / "actor_hf" / "config.json").exists()
    assert "iteration 1/50: score" in text and f"iteration {trained}/50: score" in text
    assert ("run interrupted" if stop == "ctrl-c" else "run stopped early: rollout-0 exited") in text
    assert f"policy_version {trained} of 50" in text
    assert f"final policy (HF) {ckpt / 'actor_hf'}" in text


def test_a_run_over_mtls_and_the_token(tmp_path, policy, redis_url, run_id):
    """`tls.enabled=true`: every process talks mTLS with the throwaway CA and the bearer token
    (the chart's secure path, here end to end): the run trains, the weights reach the replica."""
    cfg = _launch_config(tmp_path, policy, redis_url, run_id, prompts=40, iterations=2, batch=8)
    cfg.tls.enabled = True
    last = launch(cfg)
    assert last["policy_version"] == 2 and last["sync_replicas_ok"] == 1 and last["sync_replicas_failed"] == 0
    logs = pathlib.Path(cfg.workdir) / "logs"
    for name in ("reward", "reference", "learner", "rollout-0"):
        assert "tls=True, token=True" in (logs / f"{name}.log").read_text(), name
