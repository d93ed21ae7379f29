"""The kubelet's probes and lifecycle hooks, run from this machine over the pod's kubelet link.

grpc: the standard grpc.health.v1 Check (plaintext, like the kubelet) against pod IP:port;
tcpSocket: a TCP connect; httpGet: a GET that must answer 200-399; exec: the command inside
the container's namespaces (nsenter into its PID 1), with the container's environment.
Every probe returns True/False within its timeoutSeconds.
"""
from __future__ import annotations

import socket
import subprocess
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def port_number(port: int | str, container: dict) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container {container['name']} has no port named {port!r}")


def exec_in(pid: int, argv: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `argv` inside the namespaces and root of container process `pid` (as `kubectl exec`)."""
    cmd = ["nsenter", "-t", str(pid), "-m", "-u", "-n", "-p", "-r", "-w", "--", *argv]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, 124, e.stdout or "", f"timed out after {timeout_s}s")


def grpc_ok(ip: str, port: int, service: str, timeout_s: float) -> bool:
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def tcp_ok(ip: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def http_ok(ip: str, port: int, path: str, scheme: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(f"{scheme.lower()}://{ip}:{port}{path}", timeout=timeout_s) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError):
        return False


def run_handler(handler: dict, ip: str, container: dict, pid: int | None, env: dict[str, str],
                timeout_s: float) -> tuple[bool, str]:
    """Run a probe or a lifecycle handler; (success, detail)."""
    if "grpc" in handler:
        g = handler["grpc"]
        return grpc_ok(ip, int(g["port"]), g.get("service", ""), timeout_s), "grpc"
    if "tcpSocket" in handler:
        return tcp_ok(ip, port_number(handler["tcpSocket"]["port"], container), timeout_s), "tcp"
    if "httpGet" in handler:
        h = handler["httpGet"]
        return http_ok(ip, port_number(h["port"], container), h.get("path", "/"), h.get("scheme", "HTTP"),
                       timeout_s), "http"
    if "exec" in handler:
        if pid is None:
            return False, "no process"
        r = exec_in(pid, handler["exec"]["command"], env, timeout_s)
        return r.returncode == 0, (r.stdout + r.stderr).strip()[-500:]
    if "sleep" in handler:
        return True, "sleep"  # the caller sleeps; see Container.run_pre_stop
    raise ValueError(f"unsupported handler {sorted(handler)}")
