"""Start a whole online-RLHF run on one machine, as processes, and supervise it.

Order: Redis (unless a URL is given) -> reward, reference, learner -> rollout
replicas -> one rollout worker per replica -> prompts enqueued. The run ends when
the learner exits after `learner.ppo.max_iterations` iterations (or on Ctrl-C or SIGTERM,
on a stall, or when any process dies, which is reported by name with the tail of its log);
then the learner is stopped first and writes a checkpoint of what it trained, and every
other process is stopped, newest first. The console shows one progress line per iteration
(a bar on a terminal, `launcher/progress.py`) and a summary with the final policy's path.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from instructrl.config import ConfigError, from_dict
from instructrl.launcher.config import LaunchConfig
from instructrl.launcher.procs import Proc, ProcessDied, Supervisor, thread_env
from instructrl.launcher.redis_local import free_port, redis_server_argv, wait_redis
from instructrl.launcher.tls import server_tls, throwaway_tls

log = logging.getLogger(__name__)


class RunStalled(RuntimeError):
    """The learner stopped making progress while every process is alive."""


@dataclasses.dataclass
class Endpoints:
    redis_url: str
    reward: str
    reference: str
    learner: str
    rollouts: list[str]
    metrics: dict[str, int]
    health: dict[str, str] = dataclasses.field(default_factory=dict)  # plaintext grpc.health address per server
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # TLS dir and token of every process (tls.enabled)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _server(section: dict, port: int, metrics_port: int, tls_dir: pathlib.Path | None = None) -> dict:
    s = copy.deepcopy(section)
    _set(s, "server.host", "127.0.0.1")
    _set(s, "server.port", port)
    _set(s, "server.metrics_port", metrics_port)
    if tls_dir is not None:  # mTLS on the gRPC port; a plaintext port that serves only grpc.health
        _set(s, "server.tls", server_tls(tls_dir))
        _set(s, "server.health_port", free_port())
    return s


def _health(section: dict, address: str) -> str:
    port = section["server"].get("health_port", -1)
    return f"127.0.0.1:{port}" if port >= 0 else address


def plan(cfg: LaunchConfig, redis_url: str) -> tuple[dict[str, dict], Endpoints]:
    """Every process's config (ports, addresses and Redis filled in), validated by its dataclass."""
    from instructrl.learner.config import LearnerConfig
    from instructrl.reference.config import ReferenceConfig
    from instructrl.reward.config import RewardConfig
    from instructrl.rollout.config import RolloutConfig
    from instructrl.rollout.worker import WorkerConfig

    workdir = pathlib.Path(cfg.workdir).resolve()
    tls_dir = workdir / "tls" if cfg.tls.enabled else None
    ports = {name: free_port() for name in ("reward", "reference", "learner")}
    metrics = {name: free_port() for name in ("reward", "reference", "learner")}
    configs: dict[str, dict] = {
        "reward": _server(cfg.reward, ports["reward"], metrics["reward"], tls_dir),
        "reference": _server(cfg.reference, ports["reference"], metrics["reference"], tls_dir),
        "learner": _server(cfg.learner, ports["learner"], metrics["learner"], tls_dir),
    }
    lrn = configs["learner"]
    _set(lrn, "buffer.redis.url", redis_url)
    _set(lrn, "buffer.run_id", cfg.run_id)
    lrn.setdefault("checkpoint", {}).setdefault("dir", str(workdir / "checkpoints"))
    lrn.setdefault("sync", {}).setdefault("master_port", free_port())
    rollouts = []
    for i in range(cfg.rollout_replicas):
        port, mport = free_port(), free_port()
        name = f"rollout-{i}"
        r = _server(cfg.rollout, port, mport, tls_dir)
        _set(r, "replica_id", name)
        configs[name] = r
        metrics[name] = mport
        rollouts.append(f"127.0.0.1:{port}")
        w = copy.deepcopy(cfg.worker)
        wport = free_port()
        _set(w, "replica_id", name)
        _set(w, "rollout.address", f"127.0.0.1:{port}")
        _set(w, "rollout_advertise", f"127.0.0.1:{port}")
        _set(w, "reward.address", f"127.0.0.1:{ports['reward']}")
        _set(w, "reference.address", f"127.0.0.1:{ports['reference']}")
        _set(w, "learner.address", f"127.0.0.1:{ports['learner']}")
        _set(w, "buffer.redis.url", redis_url)
        _set(w, "buffer.run_id", cfg.run_id)
        _set(w, "metrics_port", wport)
        configs[f"worker-{i}"] = w
        metrics[f"worker-{i}"] = wport
    classes: dict[str, type] = {"reward": RewardConfig, "reference": ReferenceConfig, "learner": LearnerConfig}
    for name, section in configs.items():
        cls = classes.get(name) or (RolloutConfig if name.startswith("rollout") else WorkerConfig)
        try:
            from_dict(cls, section)
        except (ConfigError, ValueError) as e:
            section_name = name.split("-")[0]
            raise ConfigError(f"{section_name}.{e}") from None
    eps = Endpoints(redis_url, f"127.0.0.1:{ports['reward']}", f"127.0.0.1:{ports['reference']}",
                    f"127.0.0.1:{ports['learner']}", rollouts, metrics)
    eps.health = {name: _health(configs[name], addr) for name, addr in
                  [("reward", eps.reward), ("reference", eps.reference), ("learner", eps.learner),
                   *((f"rollout-{i}", a) for i, a in enumerate(rollouts))]}
    if tls_dir is not None:
        eps.env = throwaway_tls(tls_dir)
    return configs, eps


def read_prompts(path: str) -> list[dict]:
    """The prompts JSONL: each line {prompt, prompt_id?, metadata?}; errors name file:line:field."""
    out = []
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"prompts: {path} does not exist")
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise ConfigError(f"{path}:{n}: field 'prompt': a non-empty string is required")
        meta = rec.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ConfigError(f"{path}:{n}: field 'metadata': a mapping of strings is required")
        out.append({"prompt_id": str(rec.get("prompt_id") or f"p{n}"), "prompt": rec["prompt"], "metadata": meta})
    if not out:
        raise ConfigError(f"prompts: {path} holds no prompts")
    return out


def enqueue(redis_url: str, run_id: str, prompts: list[dict], epochs: int) -> int:
    """Put every prompt on the run's prompt stream once per epoch."""
    from instructrl.buffer import BufferConfig, PromptQueue
    from instructrl.buffer.config import RedisConfig
    from instructrl.v1 import common_pb2, experience_pb2

    q = PromptQueue.open(BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id))
    n = 0
    try:
        for epoch in range(epochs):
            recs = [experience_pb2.PromptRecord(prompt_id=p["prompt_id"], epoch=epoch,
                                                prompt=common_pb2.Sequence(text=p["prompt"]),
                                                metadata=p["metadata"]) for p in prompts]
            n += q.put_prompts(recs, epoch)
    finally:
        q.close()
    return n


def launch(cfg: LaunchConfig, on_progress: Callable[[dict], None] | None = None,
           stop_when: Callable[[dict], bool] | None = None,
           on_started: Callable[[Endpoints], None] | None = None,
           on_status: Callable[[dict, dict | None], None] | None = None) -> dict:
    """Run everything until the learner finishes. Returns the learner's last JSONL record.

    `on_progress(record)` sees each learner JSONL record, `on_status(record, status)` the same
    record with the learner's `GetStatus` as a dict, asked once the record was read (None if
    the learner did not answer); `stop_when(record)` may end the run early, `on_started(endpoints)`
    is told every address and metrics port once all are serving.

    However the run ends (finished, `stop_when`, a dead process, a stall, Ctrl-C), the learner is
    stopped first, alone, while Redis and the services still run: it finishes its iteration and
    writes a checkpoint of what it trained (`learner_stop_timeout_s`); then the others stop.

    Raises `ProcessDied` naming the process that died, after stopping the others.
    """
    workdir = pathlib.Path(cfg.workdir).resolve()
    (workdir / "configs").mkdir(parents=True, exist_ok=True)
    logdir = workdir / "logs"
    prompts = read_prompts(cfg.prompts) if cfg.prompts else []
    with Supervisor(logdir) as sup:
        redis_url = cfg.redis_url
        if not redis_url:
            port = free_port()
            sup.start("redis", redis_server_argv(port, workdir / "redis"))
            redis_url = f"redis://127.0.0.1:{port}/0"
            wait_redis(redis_url)
        configs, eps = plan(cfg, redis_url)
        for name, section in configs.items():
            (workdir / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
        # lines already in the log belong to an earlier launch into this workdir (counted before the
        # learner starts: resumed, it may train at once on experience left in the buffer)
        follow = _Follower(_jsonl_path(configs["learner"]), eps.learner, on_progress, on_status, eps.env)
        learner = _start_services(cfg, sup, eps, workdir)
        try:
            if prompts:
                n = enqueue(redis_url, cfg.run_id, prompts, cfg.epochs)
                log.info("enqueued %d prompts (%d epochs)", n, cfg.epochs)
            if on_started:
                on_started(eps)
            return _watch(cfg, sup, learner, follow, logdir, stop_when)
        finally:
            stop_learner(learner, cfg.learner_stop_timeout_s)
            follow.poll(ask_status=False)  # the iterations it finished while stopping
            sup.stop(cfg.grace_s)


def _start_services(cfg: LaunchConfig, sup: Supervisor, eps: Endpoints, workdir: pathlib.Path) -> Proc:
    """Start reward, reference, learner and the rollouts, wait until all serve, start the workers."""
    t = cfg.threads
    cfgfile = lambda n: str(workdir / "configs" / f"{n}.yaml")  # noqa: E731
    started = time.monotonic()
    procs = [
        sup.python("reward", ["serve", "reward", "--config", cfgfile("reward")],
                   env=thread_env(t.reward, eps.env), health_address=eps.health["reward"]),
        sup.python("reference", ["serve", "reference", "--config", cfgfile("reference")],
                   env=thread_env(t.reference, eps.env), health_address=eps.health["reference"]),
        sup.python("learner", ["serve", "learner", "--config", cfgfile("learner")],
                   env=thread_env(t.learner, eps.env), health_address=eps.health["learner"]),
    ]
    for i in range(len(eps.rollouts)):
        procs.append(sup.python(f"rollout-{i}", ["serve", "rollout", "--config", cfgfile(f"rollout-{i}")],
                                env=thread_env(t.rollout, {"VLLM_CPU_KVCACHE_SPACE": "1", **eps.env}),
                                health_address=eps.health[f"rollout-{i}"]))
    for p in procs:
        sup.wait_healthy(p, cfg.health_timeout_s)
        log.info("%s is serving (%.0fs)", p.name, time.monotonic() - started)
    for i in range(cfg.rollout_replicas):
        sup.python(f"worker-{i}", ["rollout-worker", "--config", cfgfile(f"worker-{i}")],
                   env=thread_env(t.worker, eps.env))
    return procs[2]


def _jsonl_path(learner: dict) -> pathlib.Path:
    return pathlib.Path(learner.get("logging", {}).get("jsonl")
                        or pathlib.Path(learner["checkpoint"]["dir"]) / "metrics.jsonl")


class _Follower:
    """Reads the learner's new JSONL records and hands them to the callbacks."""

    def __init__(self, jsonl: pathlib.Path, address: str, on_progress: Callable[[dict], None] | None,
                 on_status: Callable[[dict, dict | None], None] | None, env: dict[str, str]):
        self.jsonl, self.address, self.on_progress, self.on_status = jsonl, address, on_progress, on_status
        self.env = env  # the TLS dir and token the launched processes get (tls.enabled), for the status calls
        self.seen = len(jsonl.read_text().split("\n")[:-1]) if jsonl.exists() else 0  # a resumed run's earlier lines
        self.last: dict = {}

    def poll(self, ask_status: bool = True) -> bool:
        """Hand on the records written since the last poll; True if there were any."""
        if not self.jsonl.exists():
            return False
        lines = self.jsonl.read_text().split("\n")[:-1]  # complete lines only (one may be half written)
        fresh = [json.loads(x) for x in lines[self.seen:] if x.strip()]
        self.seen = len(lines)
        status = poll_status(self.address, self.env) if fresh and self.on_status and ask_status else None
        for rec in fresh:
            self.last = rec
            if self.on_progress:
                self.on_progress(rec)
            if self.on_status:
                self.on_status(rec, status)  # the state now: also for a record logged a moment earlier
        return bool(fresh)


def _watch(cfg: LaunchConfig, sup: Supervisor, learner: Proc, follow: _Follower, logdir: pathlib.Path,
           stop_when: Callable[[dict], bool] | None) -> dict:
    """Follow the learner's JSONL log until it exits (or `stop_when`); raise on a death or a stall."""
    progressed = time.monotonic()
    while True:
        if follow.poll():
            progressed = time.monotonic()
        last = follow.last
        if last and cfg.stall_timeout_s and time.monotonic() - progressed > cfg.stall_timeout_s:
            raise RunStalled(f"the learner logged no iteration for {cfg.stall_timeout_s:.0f}s after "
                             f"policy_version {last.get('policy_version')}: are the prompts exhausted "
                             f"(epochs={cfg.epochs})? see {logdir}")
        if not learner.alive():
            if learner.popen.returncode != 0:
                raise ProcessDied(learner)
            follow.poll(ask_status=False)
            return follow.last
        if stop_when and last and stop_when(last):
            return last
        sup.check(exclude=("learner",))
        time.sleep(1.0)


def poll_status(address: str, env: dict[str, str] | None = None, timeout_s: float = 5.0) -> dict | None:
    """The learner's `GetStatus` as a dict, or None when it does not answer (busy, stopping). `env`:
    the launched processes' TLS dir and token (`tls.enabled`), which this process does not have."""
    import grpc

    from instructrl.learner.status import fetch
    from instructrl.serving.client import TOKEN_ENV, ClientConfig, resolve_tls

    cfg = ClientConfig(address=address, timeout_s=timeout_s, token=(env or {}).get(TOKEN_ENV, ""))
    try:
        return fetch(resolve_tls(cfg, env) if env else cfg)
    except grpc.RpcError:
        return None


def stop_learner(learner: Proc, timeout_s: float) -> None:
    """SIGTERM the learner alone and wait: it finishes the iteration in progress (or leaves its wait
    for a batch), writes a checkpoint of what it trained and exits (`learner/server.py`)."""
    if not learner.alive():
        return
    log.info("stopping the learner: it writes a checkpoint of what it trained (up to %.0fs)", timeout_s)
    try:
        os.killpg(learner.popen.pid, signal.SIGTERM)
        learner.popen.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        log.warning("the learner did not stop within %.0fs; its last regular checkpoint stands", timeout_s)


def final_outputs(checkpoint_dir: str | pathlib.Path) -> tuple[str | None, str | None]:
    """(newest complete checkpoint, its actor_hf/ directory), each None when absent
    (the same rule as `learner.checkpoint.latest`: iteration-NNNNNNNN/ with a state.json)."""
    root = pathlib.Path(checkpoint_dir)
    done = sorted(d for d in root.glob("iteration-" + "[0-9]" * 8) if (d / "state.json").exists())
    if not done:
        return None, None
    hf = done[-1] / "actor_hf"
    return str(done[-1]), str(hf) if (hf / "config.json").exists() else None


def resumed_samples(cfg: LaunchConfig, checkpoint_dir: str | pathlib.Path) -> int:
    """Samples the learner's lineage had trained before this launch (0 for a fresh run): those of
    the checkpoint it resumes from."""
    if cfg.learner.get("checkpoint", {}).get("resume", True) is False:
        return 0
    ckpt, _ = final_outputs(checkpoint_dir)
    return int(json.loads((pathlib.Path(ckpt) / "state.json").read_text())["samples_trained"]) if ckpt else 0


def main(argv: list[str]) -> int:
    from instructrl.config import parse_cli
    from instructrl.launcher import progress

    cfg = parse_cli("instructrl launch", LaunchConfig, argv, __doc__.splitlines()[0], "learner.ppo.max_iterations=20")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    console = progress.Console()
    limit = int(cfg.learner.get("ppo", {}).get("max_iterations", 0) or 0)

    ckpt_dir = cfg.learner.get("checkpoint", {}).get("dir") or pathlib.Path(cfg.workdir).resolve() / "checkpoints"
    console.start = progress.snapshot({"samples_trained": resumed_samples(cfg, ckpt_dir)}, None, limit)

    def show(rec: dict, status: dict | None) -> None:
        console.update(progress.snapshot(rec, status, limit))

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_sigterm)  # `kill` stops the run as Ctrl-C does: a checkpoint first
    code, outcome = 0, "finished"
    try:
        launch(cfg, on_status=show)
    except ConfigError as e:
        print(f"instructrl launch: {e}", file=sys.stderr)
        return 2
    except (ProcessDied, RunStalled) as e:
        print(f"instructrl launch: {e}", file=sys.stderr)
        code, outcome = 1, f"stopped early: {str(e).splitlines()[0]}"
    except KeyboardInterrupt:
        code, outcome = 130, "interrupted; all processes stopped"
    last_ckpt, hf = final_outputs(ckpt_dir)
    console.say(progress.summary(console.history, console.start, outcome, hf, last_ckpt))
    return code
