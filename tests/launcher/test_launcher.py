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


def test_a_relaunch_counts_from_the_checkpoint_it_resumes(tmp_path):
    """Re-launching into a workdir: the summary counts what this launch trained, from the
    checkpoint the learner resumes from (the newest complete one), not the lineage's total."""
    from instructrl.launcher.run import final_outputs, resumed_samples

    ckpts = tmp_path / "checkpoints"
    cfg = _cfg(workdir=str(tmp_path))
    assert resumed_samples(cfg, ckpts) == 0 and final_outputs(ckpts) == (None, None)
    for v, n in ((3, 48), (6, 96)):
        (ckpts / f"iteration-{v:08d}" / "actor_hf").mkdir(parents=True)
        (ckpts / f"iteration-{v:08d}" / "state.json").write_text(json.dumps({"samples_trained": n}))
    (ckpts / "iteration-00000009").mkdir()  # incomplete: no state.json
    (ckpts / "iteration-00000006" / "actor_hf" / "config.json").write_text("{}")
    assert resumed_samples(cfg, ckpts) == 96
    assert final_outputs(ckpts) == (str(ckpts / "iteration-00000006"), str(ckpts / "iteration-00000006" / "actor_hf"))
    assert resumed_samples(_cfg(workdir=str(tmp_path), learner={"model": {"actor_path": "/m"},
                                                                 "checkpoint": {"resume": False}}), ckpts) == 0


def test_tls_enabled_generates_a_throwaway_ca_and_every_call_needs_cert_and_token(tmp_path, monkeypatch):
    """`instructrl launch tls.enabled=true`: servers get mTLS with a generated certificate and a
    plaintext health port; every process gets the TLS dir and token in its environment, from
    which clients configure themselves (the chart's path). Checked over real sockets."""
    import asyncio

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from instructrl.reward.client import RewardClient
    from instructrl.reward.config import RewardConfig
    from instructrl.reward.server import reward_server
    from instructrl.serving.client import ClientConfig

    configs, eps = plan(_cfg(workdir=str(tmp_path / "run"), tls={"enabled": True}), "redis://127.0.0.1:1/0")
    tls_dir = tmp_path / "run" / "tls"
    assert {f.name for f in tls_dir.iterdir()} >= {"ca.crt", "tls.crt", "tls.key", "token"}
    assert eps.env["INSTRUCTRL_TLS_DIR"] == str(tls_dir) and eps.env["INSTRUCTRL_MTLS"] == "true"
    assert len(eps.env["INSTRUCTRL_TOKEN"]) >= 32
    for name in ("reward", "reference", "learner", "rollout-0"):
        server = configs[name]["server"]
        assert server["tls"]["require_client_auth"] is True and server["tls"]["cert_file"] == str(tls_dir / "tls.crt")
        assert eps.health[name] == f"127.0.0.1:{server['health_port']}"
    section = {**configs["reward"], "rule": "instructrl.reward.rules:exact_match"}
    for k, v in eps.env.items():  # what every launched process gets
        monkeypatch.setenv(k, v)

    async def main():
        srv = await reward_server(from_dict(RewardConfig, section)).start()
        item = [("q", "x", {"answer": "x"})]
        try:
            async with RewardClient(ClientConfig(address=eps.reward, timeout_s=10)) as client:  # from the env
                assert (await client.score(item))[0] == [1.0]
            async with RewardClient(ClientConfig(address=eps.reward, token="wrong", timeout_s=10)) as client:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.score(item)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            monkeypatch.setenv("INSTRUCTRL_MTLS", "false")  # no client certificate: the handshake fails
            async with RewardClient(ClientConfig(address=eps.reward, timeout_s=3)) as client:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await client.score(item)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            async with grpc.aio.insecure_channel(eps.health["reward"]) as ch:  # what the launcher polls
                h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert h.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await srv.stop(0)
    asyncio.run(main())
