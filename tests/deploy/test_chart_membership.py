"""How the chart's pods become members of a run (issue 13): every rollout replica registers
under its own id, leaves the weight group cleanly when scaled down, and the roles it calls
are reached through Services that list every pod.

The command lines are loaded with the programs' own config dataclasses (as
test_chart_commands.py does), and the preStop hook's command is run for real.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import deploy_support as ds
import pytest
import yaml
from deploy_support import free_port
from test_chart_commands import RUNTIME_ENV, _expand, load_worker_config


def _rollout_server_config(r: ds.Rendered, pod_name: str):
    from instructrl.config import apply_overrides, from_dict
    from instructrl.rollout.config import RolloutConfig

    c = ds.server_container(r, "rollout")
    env = {**RUNTIME_ENV, "POD_NAME": pod_name}
    args = [_expand(a, env) for a in c["args"][4:]]
    data = yaml.safe_load(r.get("ConfigMap", "-config")["data"]["rollout.yaml"]) or {}
    return from_dict(RolloutConfig, apply_overrides(data, args))


# --- bug 1: one replica id per rollout pod ----------------------------------------------

@pytest.mark.parametrize("values", [{}, {"rollout": {"configOverrides": ["limits.max_n=8"],
                                                     "worker": {"configOverrides": ["claim_batch=8"]}}}],
                         ids=["defaults", "own-overrides"])
def test_every_rollout_pod_registers_under_its_own_id(values):
    """Two pods of the rollout Deployment: each worker's consumer name / registered id is its
    pod's name, equal to its rollout server's replica_id, and the two differ (the learner keys
    replicas by it). A user's own configOverrides do not lose it."""
    r = ds.render(values)
    pods = ["rl-instructrl-rollout-6c9d7-abcde", "rl-instructrl-rollout-6c9d7-fghij"]
    ids = []
    for pod in pods:
        worker = load_worker_config(r, pod)
        server = _rollout_server_config(r, pod)
        assert worker.replica_id == pod, worker.replica_id
        assert server.replica_id == pod, server.replica_id
        ids.append(worker.replica_id)
    assert len(set(ids)) == len(pods)


# --- bug 2: scaling rollout down drains the worker before its rollout server stops ----------

def _hook_command(r: ds.Rendered) -> list[str]:
    c = ds.server_container(r, "rollout")
    return c["lifecycle"]["preStop"]["exec"]["command"]


def _venv_env() -> dict:
    """The image has its venv's bin first on PATH (`python`, `instructrl`); so does this run."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_scale_down_drain_hook_and_grace_period():
    r = ds.render()
    pod = r.get("Deployment", "-rollout")["spec"]["template"]["spec"]
    c = ds.containers(r.get("Deployment", "-rollout"))
    # the server waits for its worker; the worker needs no hook (SIGTERM is its drain signal)
    assert "lifecycle" in c["rollout"] and "lifecycle" not in c["worker"]
    cmd = _hook_command(r)
    assert cmd[0] == "python" and cmd[-2:] == ["9091", "90"]  # the worker's metrics port, drainTimeoutSeconds
    assert pod["terminationGracePeriodSeconds"] >= 90 + 10
    # no worker, nothing to wait for
    assert "lifecycle" not in ds.server_container(ds.render({"rollout": {"worker": {"enabled": False}}}), "rollout")
    helm = ds.require_module("helm_python")
    with helm.Chart.load(str(ds.CHART)) as chart:
        with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds=95 must exceed"):
            chart.render({"rollout": {"terminationGracePeriodSeconds": 95}}, name="rl", namespace="ml")


def test_drain_hook_waits_for_the_real_worker_to_drain(tmp_path, redis_url, run_id):
    """The pod's scale-down, with the real processes: the rollout worker from its rendered
    command line (idle, on the test Redis), the server container's preStop hook as rendered.
    The hook holds the server up while the worker runs, the kubelet's SIGTERM makes the worker
    drain and exit cleanly, and the hook then returns at once."""
    metrics = free_port()
    r = ds.render({"ports": {"workerMetrics": metrics}, "rollout": {"worker": {"drainTimeoutSeconds": 60}}})
    worker = ds.containers(r.get("Deployment", "-rollout"))["worker"]
    env = {**RUNTIME_ENV, "POD_NAME": "rl-instructrl-rollout-abc-12345",
           **{e["name"]: e["value"] for e in worker["env"] if "value" in e},
           "INSTRUCTRL_REDIS_URL": redis_url, "INSTRUCTRL_RUN_ID": run_id,
           "INSTRUCTRL_LEARNER_ADDRESS": ""}  # no learner here: the worker registers nowhere
    env = {k: _expand(v, env) for k, v in env.items()}
    args = [_expand(a, env) for a in worker["args"]]
    config = tmp_path / "rollout-worker.yaml"
    config.write_text(r.get("ConfigMap", "-config")["data"]["rollout-worker.yaml"])
    args[args.index("/etc/instructrl/config.yaml")] = str(config)
    env.pop("INSTRUCTRL_REDIS_PASSWORD", None)
    log = open(tmp_path / "worker.log", "w")
    proc = subprocess.Popen(["instructrl", *args], env={**_venv_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    hook = None
    try:
        _wait_port(metrics, proc)
        hook = subprocess.Popen(_hook_command(r), env=_venv_env())
        time.sleep(3)
        assert hook.poll() is None, "the hook returned while the worker was still running"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the kubelet: the worker has no hook, it is signalled at once
        assert proc.wait(timeout=30) == 0, (tmp_path / "worker.log").read_text()[-2000:]
        assert hook.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 10, "the hook noticed the worker's exit late"
    finally:
        _stop(proc)
        if hook is not None:
            _stop(hook)
        log.close()  # run_id's keys go with the fixture


def test_drain_hook_gives_up_at_its_timeout():
    """A worker that never exits: the hook returns after drainTimeoutSeconds, inside the grace
    period, so the kubelet's SIGTERM still reaches the server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = ds.render({"ports": {"workerMetrics": port}, "rollout": {"worker": {"drainTimeoutSeconds": 3}}})
        t0 = time.monotonic()
        hook = subprocess.run(_hook_command(r), env=_venv_env(), timeout=30)
        took = time.monotonic() - t0
    assert hook.returncode == 0
    assert 3 <= took < 6, took


# --- bug 7: the Services the worker dials list every ready pod ------------------------------

@pytest.mark.parametrize("role", ["reward", "reference"])
def test_scorer_services_resolve_to_every_ready_pod(role):
    """gRPC balances calls over the addresses its name resolver returns (round_robin; the
    client side is issue 13 bug 7's Python half): only a headless Service makes the name the
    worker dials resolve to every pod. Not-ready pods (still loading) are left out of DNS."""
    import scrape_plan
    r = ds.render({role: {"replicas": 3}})
    svc = r.get("Service", f"-{role}")
    assert svc["spec"]["clusterIP"] == "None"
    assert not svc["spec"].get("publishNotReadyAddresses")
    selected = [p for p in scrape_plan.pods(r) if svc["spec"]["selector"].items() <= p.label_map().items()]
    assert len(selected) == 3 and {p.component for p in selected} == {role}
    worker = ds.containers(r.get("Deployment", "-rollout"))["worker"]
    address = ds.env_of(worker)[f"INSTRUCTRL_{role.upper()}_ADDRESS"]["value"]
    assert address == f"{svc['metadata']['name']}:50051"
    assert f"{role}.address=$(INSTRUCTRL_{role.upper()}_ADDRESS)" in worker["args"]
