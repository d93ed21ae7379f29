"""The bed itself, fast (no models): hand-written manifests of small Python pods.

Two pods on their own addresses, Service names (headless: every ready pod; ClusterIP: one),
ConfigMap and Secret volumes and env with $(VAR) expansion and the downward API, a link cut
and healed, SIGKILL and restart, a crash loop's growing backoff, and a scale-down that runs
preStop, then SIGTERM, then SIGKILL after the grace period. Cleanup leaves nothing behind.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from clusterbed import KubeletConfig
from clusterbed.fabric import netns_names

SERVER = """
import os, signal, socket, sys, time
def on_term(*_):
    with open(os.path.join(os.environ["MARKER_DIR"], os.environ["POD_NAME"]), "a") as f:
        f.write(f"sigterm {time.time()}\\n")
    if os.environ.get("IGNORE_TERM") != "yes":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(f"{socket.gethostname()} {os.environ['POD_IP']}".encode())
    c.close()
"""

DIAL = "import socket, sys; print(socket.create_connection((sys.argv[1], 8080), timeout=2).recv(200).decode())"


def _deployment(name: str, replicas: int, container: dict, grace: int = 5) -> dict:
    labels = {"app": name}
    markers = {"name": "markers", "persistentVolumeClaim": {"claimName": "markers"}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"terminationGracePeriodSeconds": grace, "containers": [container],
                                           "volumes": [{"name": "app", "configMap": {"name": "app"}}, markers]}}}}


def _service(name: str, app: str, headless: bool) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"clusterIP": "None" if headless else "10.0.0.1", "selector": {"app": app},
                     "ports": [{"port": 8080}]}}


def _objects() -> list[dict]:
    echo = {
        "name": "echo", "image": "python:3.11", "command": ["python3", "/app/server.py"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "GREETING", "value": "hello $(POD_NAME) with $(TOKEN), $$(POD_IP) and $(UNDEFINED)"},
                {"name": "MARKER_DIR", "value": "/markers"},
                {"name": "IGNORE_TERM", "value": "no"}],
        "ports": [{"name": "echo", "containerPort": 8080}],
        "readinessProbe": {"tcpSocket": {"port": "echo"}, "periodSeconds": 1},
        "lifecycle": {"preStop": {"exec": {"command": [
            "sh", "-c", "echo prestop $(date +%s.%N) >> $MARKER_DIR/$POD_NAME; sleep 0.5"]}}},
        "volumeMounts": [{"name": "app", "mountPath": "/app", "readOnly": True},
                         {"name": "markers", "mountPath": "/markers"}]}
    stubborn = {**echo, "name": "stubborn", "env": echo["env"][:-1] + [{"name": "IGNORE_TERM", "value": "yes"}]}
    crasher = {"name": "crasher", "image": "python:3.11",
               "command": ["python3", "-c", "import sys; print('crash'); sys.exit(3)"]}
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"}, "data": {"server.py": SERVER}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}},
        _deployment("echo", 2, echo),
        _deployment("stubborn", 1, stubborn, grace=2),
        _deployment("crasher", 1, crasher),
        _service("echo", "echo", headless=True),
        _service("echo-vip", "echo", headless=False),
    ]


def _ips(getent_output: str) -> list[str]:
    return sorted({line.split()[0] for line in getent_output.splitlines()})


def _run(cluster, pod, *argv: str) -> str:
    r = cluster.exec(pod.name, next(iter(pod.containers)), list(argv))
    assert r.returncode == 0, f"{argv}: {r.stdout}{r.stderr}"
    return r.stdout.strip()


def _fails(cluster, pod, *argv: str) -> bool:
    return cluster.exec(pod.name, next(iter(pod.containers)), list(argv)).returncode != 0


def test_pods_services_partitions_restarts_and_termination(make_cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    cluster = make_cluster(objects=_objects(), claims={"markers": markers},
                           kubelet=KubeletConfig(backoff_base_s=0.5, backoff_cap_s=4.0))
    a, b = cluster.wait_ready("echo", timeout_s=60)
    cluster.wait_ready("stubborn", timeout_s=60)
    assert a.ip != b.ip and a.host.ns != b.host.ns

    # names: headless -> both pods, ClusterIP -> one, every form; own hostname; nothing else resolves
    assert _ips(_run(cluster, a, "getent", "ahostsv4", "echo")) == sorted([a.ip, b.ip])
    for name in ("echo.ml", "echo.ml.svc", "echo.ml.svc.cluster.local"):
        assert _ips(_run(cluster, b, "getent", "ahostsv4", name)) == sorted([a.ip, b.ip])
    assert len(_ips(_run(cluster, a, "getent", "ahostsv4", "echo-vip"))) == 1
    assert _run(cluster, a, "hostname") == a.name
    assert _fails(cluster, a, "getent", "hosts", "example.com")

    # the container sees its ConfigMap, Secret, env and downward API; the machine does not
    env = _run(cluster, a, "sh", "-c", "echo $GREETING")
    assert env == f"hello {a.name} with s3cret, $(POD_IP) and $(UNDEFINED)"
    assert "socket.gethostname()" in _run(cluster, a, "cat", "/app/server.py")
    assert not Path("/app/server.py").exists() and not Path("/markers").exists()

    # pod to pod by address and by name; a cut link times out (the kubelet still reaches it), heal
    assert _run(cluster, a, "python3", "-c", DIAL, b.ip) == f"{b.name} {b.ip}"
    cluster.cut(b.name)
    assert _fails(cluster, a, "python3", "-c", DIAL, b.ip)
    assert b.ready, "a partition must not fail the kubelet's probes (they come from the pod's node)"
    cluster.heal(b.name)
    assert _run(cluster, a, "python3", "-c", DIAL, b.ip) == f"{b.name} {b.ip}"

    # SIGKILL: the container restarts in place, same pod, same address
    cluster.kill(b.name)
    cluster.wait_until(lambda: b.containers["echo"].restarts == 1 and b.ready, 30, "echo restarted")
    assert b.containers["echo"].exit_codes == [137]
    assert _run(cluster, a, "python3", "-c", DIAL, b.ip) == f"{b.name} {b.ip}"

    # a crash loop backs off: 0, 0.5, 1, 2 s between exit and the next start
    crasher = cluster.pods_of("crasher")[0].containers["crasher"]
    cluster.wait_until(lambda: len(crasher.starts) >= 5, 30, "five starts of the crasher")
    gaps = [t1 - t0 for t0, t1 in zip(crasher.starts, crasher.starts[1:], strict=False)]
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3] and gaps[3] >= 2.0, gaps
    assert set(crasher.exit_codes) == {3}

    # scale down: out of the Service first, preStop, then SIGTERM; SIGKILL after the grace period
    took = cluster.scale("echo", 1)
    (gone,) = took
    left = cluster.pods_of("echo")[0]
    assert _ips(_run(cluster, left, "getent", "ahostsv4", "echo")) == [left.ip]
    lines = (markers / gone).read_text().split()
    assert lines[0::2] == ["prestop", "sigterm"] and float(lines[1]) <= float(lines[3]), lines
    stubborn = cluster.pods_of("stubborn")[0]
    t0 = time.monotonic()
    cluster.scale("stubborn", 0)
    assert 2.0 <= time.monotonic() - t0 < 6.0, "SIGTERM ignored: SIGKILL after terminationGracePeriodSeconds"
    assert (markers / stubborn.name).read_text().count("sigterm") == 1

    # cleanup: no namespace, hosts entry or process of this run is left
    token = cluster.fabric.token
    pids = [c.proc.pid for p in cluster.history for c in p.containers.values()]
    cluster.close()
    assert not [n for n in netns_names() if n.startswith(token)]
    assert not list(Path("/etc/netns").glob(f"{token}*"))
    assert token not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}") and
                Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]


CRASHING_RUN = """
import subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from clusterbed.fabric import Fabric
fabric = Fabric()
host = fabric.add_host("victim")
sleeper = subprocess.Popen(["ip", "netns", "exec", host.ns, "sleep", "300"])
print(fabric.token, sleeper.pid, flush=True)
time.sleep(300)
"""


def test_leftovers_of_a_crashed_run_are_removed():
    """A run SIGKILLed mid-way leaves its namespaces, links, hosts entry and processes; the next
    session's cleanup removes them (and nothing of a live run)."""
    from clusterbed import remove_leftovers
    here = str(Path(__file__).resolve().parent)
    run = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, here], stdout=subprocess.PIPE, text=True)
    token, sleeper = run.stdout.readline().split()
    run.kill()
    run.wait()
    assert [n for n in netns_names() if n.startswith(token)] and os.path.exists(f"/proc/{sleeper}")
    assert token in remove_leftovers()
    assert not [n for n in netns_names() if n.startswith(token)]
    assert not list(Path("/etc/netns").glob(f"{token}*"))
    assert token not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{sleeper}") or Path(f"/proc/{sleeper}/stat").read_text().split()[2] == "Z"
