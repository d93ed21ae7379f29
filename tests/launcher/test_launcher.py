"""Launcher pieces: config validation naming the section, prompt files, process supervision."""
from __future__ import annotations

import json
import sys
import time

import pytest

from instructrl.config import ConfigError, from_dict
from instructrl.launcher.config import LaunchConfig
from instructrl.launcher.procs import ProcessDied, Supervisor
from instructrl.launcher.run import plan, read_prompts


def _cfg(**kw) -> LaunchConfig:
    base = {"reward": {"rule": "instructrl.reward.rules:exact_match"}, "reference": {"model": "/m"},
            "rollout": {"engine": {"model": "/m"}}, "learner": {"model": {"actor_path": "/m"}}}
    base.update(kw)
    return from_dict(LaunchConfig, base)


def test_plan_fills_ports_addresses_and_redis():
    configs, eps = plan(_cfg(rollout_replicas=2, run_id="r1"), "redis://127.0.0.1:1/0")
    assert set(configs) == {"reward", "reference", "learner", "rollout-0", "rollout-1", "worker-0", "worker-1"}
    w1 = configs["worker-1"]
    assert w1["rollout"]["address"] == eps.rollouts[1] and w1["reward"]["address"] == eps.reward
    assert w1["buffer"] == {"redis": {"url": "redis://127.0.0.1:1/0"}, "run_id": "r1"}
    assert configs["learner"]["buffer"]["run_id"] == "r1"
    ports = [configs[n]["server"]["port"] for n in ("reward", "reference", "learner", "rollout-0", "rollout-1")]
    assert len(set(ports)) == 5


def test_plan_names_the_bad_section_and_field():
    with pytest.raises(ConfigError, match=r"learner\.ppo\.kl_cof: unknown field"):
        plan(_cfg(learner={"ppo": {"kl_cof": 1}}), "redis://x")
    with pytest.raises(ConfigError, match=r"reward\.model/rule"):
        plan(_cfg(reward={}), "redis://x")


def test_read_prompts_errors_name_file_line_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ConfigError, match=r"p\.jsonl:2: field 'prompt'"):
        read_prompts(str(f))
    f.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"p\.jsonl:1: not valid JSON"):
        read_prompts(str(f))
    f.write_text(json.dumps({"prompt": "a", "metadata": {"k": 1}}) + "\n")
    with pytest.raises(ConfigError, match="field 'metadata'"):
        read_prompts(str(f))
    f.write_text(json.dumps({"prompt": "sort: 2 1 =>", "metadata": {"answer": " 1 2"}}) + "\n")
    assert read_prompts(str(f)) == [{"prompt_id": "p1", "prompt": "sort: 2 1 =>", "metadata": {"answer": " 1 2"}}]


def test_supervisor_reports_which_process_died_and_stops_the_rest(tmp_path):
    with Supervisor(tmp_path) as sup:
        sleeper = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        sup.start("crasher", [sys.executable, "-c", "import sys; print('bad weights'); sys.exit(3)"])
        deadline = time.monotonic() + 20
        with pytest.raises(ProcessDied) as e:
            while time.monotonic() < deadline:
                sup.check()
                time.sleep(0.1)
        assert e.value.proc.name == "crasher" and "code 3" in str(e.value) and "bad weights" in str(e.value)
    assert not sleeper.alive()


def test_supervisor_escalates_to_sigkill(tmp_path):
    sup = Supervisor(tmp_path)
    stubborn = sup.start("stubborn", [sys.executable, "-c",
                                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ready', flush=True); time.sleep(60)"])
    deadline = time.monotonic() + 10
    while "ready" not in stubborn.log_tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    sup.stop(grace_s=1.0)
    assert not stubborn.alive() and time.monotonic() - t0 < 8
