"""The chart's command lines load with the services' own typed configs: `config.<role>` plus
the `key=value` overrides the chart appends are valid for that role's config dataclass
(unknown keys and wrong types raise ConfigError naming the field), in every scenario."""
from __future__ import annotations

import importlib
import re

import pytest
import yaml

import deploy_support as ds

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
