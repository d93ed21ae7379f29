"""The chart's command lines load with the services' own typed configs: `config.<role>` plus
the `key=value` overrides the chart appends are valid for that role's config dataclass
(unknown keys and wrong types raise ConfigError naming the field), in every scenario."""
from __future__ import annotations

import importlib
import re

import deploy_support as ds
import pytest
import yaml

SCENARIOS = ds.ci_values()

CONFIG_CLASSES = {
    "rollout": ("instructrl.rollout.config", "RolloutConfig"),
    "reward": ("instructrl.reward.config", "RewardConfig"),
    "reference": ("instructrl.reference.config", "ReferenceConfig"),
    "learner": ("instructrl.learner.config", "LearnerConfig"),
}
# What $(VAR) expands to for env that comes from the downward API or a Secret.
RUNTIME_ENV = {"POD_NAME": "rl-instructrl-x-0", "POD_NAMESPACE": "ml", "POD_IP": "10.1.2.3",
               "INSTRUCTRL_REDIS_URL": "redis://rl-instructrl-redis.ml.svc:6379/0",
               "INSTRUCTRL_REDIS_PASSWORD": "pw", "INSTRUCTRL_TOKEN": "t"}


def _expand(arg: str, env: dict) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_command_lines_load_with_the_service_configs(rendered, scenario):
    from instructrl.config import apply_overrides, from_dict

    r = rendered[scenario]
    data = r.get("ConfigMap", "-config")["data"]
    for role, (module, cls_name) in CONFIG_CLASSES.items():
        cls = getattr(importlib.import_module(module), cls_name)
        c = ds.server_container(r, role)
        env = {**RUNTIME_ENV, **{e["name"]: e["value"] for e in c["env"] if "value" in e}}
        args = [_expand(a, env) for a in c["args"][4:]]
        assert not [a for a in args if "$(" in a], f"{role}: unexpanded {args}"
        cfg = from_dict(cls, apply_overrides(yaml.safe_load(data[f"{role}.yaml"]) or {}, args))
        assert cfg.server.host == "0.0.0.0" and cfg.server.port == 50051 and cfg.server.metrics_port == 9090
        assert cfg.server.tls.enabled == bool(SCENARIOS[scenario].get("tls", {}).get("enabled"))
        if role == "learner":
            assert cfg.buffer.redis.url == RUNTIME_ENV["INSTRUCTRL_REDIS_URL"]
            assert (cfg.sync.master_addr, cfg.sync.master_port) == ("10.1.2.3", 29600)


def load_worker_config(r: ds.Rendered, pod_name: str):
    """The rollout worker's command line of a rendered rollout pod, expanded for a pod of that
    name and loaded with the worker's own config dataclass."""
    from instructrl.config import apply_overrides, from_dict
    from instructrl.rollout.worker import WorkerConfig

    worker = ds.containers(r.get("Deployment", "-rollout"))["worker"]
    assert worker["args"][:3] == ["rollout-worker", "--config", "/etc/instructrl/config.yaml"]
    env = {**RUNTIME_ENV, "POD_NAME": pod_name, **{e["name"]: e["value"] for e in worker["env"] if "value" in e}}
    env = {k: _expand(v, env) for k, v in env.items()}  # $(POD_IP) inside INSTRUCTRL_ADVERTISE_ADDRESS
    args = [_expand(a, env) for a in worker["args"][3:]]
    assert not [a for a in args if "$(" in a], f"worker: unexpanded {args}"
    data = yaml.safe_load(r.get("ConfigMap", "-config")["data"]["rollout-worker.yaml"]) or {}
    return from_dict(WorkerConfig, apply_overrides(data, args))


@pytest.mark.parametrize("scenario", sorted(s for s, v in SCENARIOS.items()
                                            if v.get("rollout", {}).get("worker", {}).get("enabled", True)))
def test_worker_command_line_loads_with_its_config(rendered, scenario):
    cfg = load_worker_config(rendered[scenario], "rl-instructrl-rollout-7d9f-abcde")
    assert cfg.rollout.address == "127.0.0.1:50051"
    assert cfg.rollout_advertise == "10.1.2.3:50051"
    assert cfg.buffer.redis.url == RUNTIME_ENV["INSTRUCTRL_REDIS_URL"]
