"""Start a whole online-RLHF run on one machine, as processes, and supervise it.

Order: Redis (unless a URL is given) -> reward, reference, learner -> rollout
replicas -> one rollout worker per replica -> prompts enqueued. The run ends when
the learner exits after `learner.ppo.max_steps` iterations (or on Ctrl-C, or when
any process dies, which is reported by name with the tail of its log); then every
process is stopped, newest first.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable

import yaml

from instructrl.config import ConfigError, from_dict
from instructrl.launcher.config import LaunchConfig
from instructrl.launcher.procs import ProcessDied, Supervisor, thread_env
from instructrl.launcher.redis_local import free_port, redis_server_argv, wait_redis

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


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _server(section: dict, port: int, metrics_port: int) -> dict:
    s = copy.deepcopy(section)
    _set(s, "server.host", "127.0.0.1")
    _set(s, "server.port", port)
    _set(s, "server.metrics_port", metrics_port)
    return s


def plan(cfg: LaunchConfig, redis_url: str) -> tuple[dict[str, dict], Endpoints]:
    """Every process's config (ports, addresses and Redis filled in), validated by its dataclass."""
    from instructrl.learner.config import LearnerConfig
    from instructrl.reference.config import ReferenceConfig
    from instructrl.reward.config import RewardConfig
    from instructrl.rollout.config import RolloutConfig
    from instructrl.rollout.worker import WorkerConfig

    ports = {name: free_port() for name in ("reward", "reference", "learner")}
    metrics = {name: free_port() for name in ("reward", "reference", "learner")}
    configs: dict[str, dict] = {
        "reward": _server(cfg.reward, ports["reward"], metrics["reward"]),
        "reference": _server(cfg.reference, ports["reference"], metrics["reference"]),
        "learner": _server(cfg.learner, ports["learner"], metrics["learner"]),
    }
    workdir = pathlib.Path(cfg.workdir).resolve()
    lrn = configs["learner"]
    _set(lrn, "buffer.redis.url", redis_url)
    _set(lrn, "buffer.run_id", cfg.run_id)
    lrn.setdefault("checkpoint", {}).setdefault("dir", str(workdir / "checkpoints"))
    lrn.setdefault("sync", {}).setdefault("master_port", free_port())
    rollouts = []
    for i in range(cfg.rollout_replicas):
        port, mport = free_port(), free_port()
        name = f"rollout-{i}"
        r = _server(cfg.rollout, port, mport)
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
           on_started: Callable[[Endpoints], None] | None = None) -> dict:
    """Run everything until the learner finishes. Returns the learner's last JSONL record.

    `on_progress(record)` sees each learner JSONL record, `stop_when(record)` may end the run
    early, `on_started(endpoints)` is told every address and metrics port once all are serving.

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
        t = cfg.threads
        cfgfile = lambda n: str(workdir / "configs" / f"{n}.yaml")  # noqa: E731
        started = time.monotonic()
        procs = [
            sup.python("reward", ["serve", "reward", "--config", cfgfile("reward")],
                       env=thread_env(t.reward), health_address=eps.reward),
            sup.python("reference", ["serve", "reference", "--config", cfgfile("reference")],
                       env=thread_env(t.reference), health_address=eps.reference),
            sup.python("learner", ["serve", "learner", "--config", cfgfile("learner")],
                       env=thread_env(t.learner), health_address=eps.learner),
        ]
        for i, addr in enumerate(eps.rollouts):
            procs.append(sup.python(f"rollout-{i}", ["serve", "rollout", "--config", cfgfile(f"rollout-{i}")],
                                    env=thread_env(t.rollout, {"VLLM_CPU_KVCACHE_SPACE": "1"}),
                                    health_address=addr))
        for p in procs:
            sup.wait_healthy(p, cfg.health_timeout_s)
            log.info("%s is serving (%.0fs)", p.name, time.monotonic() - started)
        for i in range(cfg.rollout_replicas):
            sup.python(f"worker-{i}", ["rollout-worker", "--config", cfgfile(f"worker-{i}")],
                       env=thread_env(t.worker))
        if prompts:
            n = enqueue(redis_url, cfg.run_id, prompts, cfg.epochs)
            log.info("enqueued %d prompts (%d epochs)", n, cfg.epochs)
        if on_started:
            on_started(eps)
        learner = next(p for p in sup.procs if p.name == "learner")
        jsonl = pathlib.Path(configs["learner"].get("logging", {}).get("jsonl")
                             or pathlib.Path(configs["learner"]["checkpoint"]["dir"]) / "metrics.jsonl")
        last: dict = {}
        seen = 0
        progressed = time.monotonic()
        while True:
            if jsonl.exists():
                lines = jsonl.read_text().splitlines()
                for line in lines[seen:]:
                    if line.strip():
                        last = json.loads(line)
                        progressed = time.monotonic()
                        if on_progress:
                            on_progress(last)
                seen = len(lines)
            if last and cfg.stall_timeout_s and time.monotonic() - progressed > cfg.stall_timeout_s:
                raise RunStalled(f"the learner logged no iteration for {cfg.stall_timeout_s:.0f}s after "
                                 f"policy_version {last.get('policy_version')}: are the prompts exhausted "
                                 f"(epochs={cfg.epochs})? see {logdir}")
            if not learner.alive():
                if learner.popen.returncode != 0:
                    raise ProcessDied(learner)
                break
            if stop_when and last and stop_when(last):
                break
            sup.check(exclude=("learner",))
            time.sleep(1.0)
        sup.stop(cfg.grace_s)
    return last


def main(argv: list[str]) -> int:
    from instructrl.config import parse_cli

    cfg = parse_cli("instructrl launch", LaunchConfig, argv, __doc__.splitlines()[0], "learner.ppo.max_steps=20")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def show(rec: dict) -> None:
        print(f"v{rec.get('policy_version')}: reward {rec.get('reward_mean', 0):.4f} "
              f"score {rec.get('score_mean', 0):.4f} kl {rec.get('kl_to_ref', 0):.4f} "
              f"kl_coef {rec.get('kl_coef', 0):.4f}", flush=True)
    try:
        launch(cfg, on_progress=show)
    except ConfigError as e:
        print(f"instructrl launch: {e}", file=sys.stderr)
        return 2
    except (ProcessDied, RunStalled) as e:
        print(f"instructrl launch: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("instructrl launch: interrupted; all processes stopped", file=sys.stderr)
        return 130
    return 0
