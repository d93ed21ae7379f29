"""Cluster DNS as /etc/hosts files: what every pod can resolve, from the Services' endpoints.

Each pod's /etc/netns/<ns>/hosts (bound to /etc/hosts in its containers) holds, in this order:
- localhost, and the pod's own name (and for a StatefulSet pod its FQDN under its Service);
- every Service of the release under its four names: <svc>, <svc>.<ns>, <svc>.<ns>.svc and
  <svc>.<ns>.svc.cluster.local:
  * a headless Service (clusterIP: None) resolves to every ready pod it selects (every pod
    not being deleted with publishNotReadyAddresses), as cluster DNS answers;
  * a ClusterIP Service resolves to ONE ready pod: the one ready for the longest (it moves when
    that pod is no longer ready). A ClusterIP is a single virtual address; listing every pod
    would let a client balance over pods where in a cluster it sees one address, and hide
    exactly the bugs (a pick_first client, one pinned connection) the bed is for;
- <pod>.<svc>... for the pods of a StatefulSet whose serviceName is a headless Service.

A name with no ready pod is absent (the lookup fails, as NXDOMAIN would). glibc reads the
file on every lookup, so a rewrite (in place, keeping the bind mounts valid) is seen at once.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

HEADER = """# Kubernetes-managed hosts file (instructrl cluster test bed).
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
"""


class PodView(Protocol):
    name: str
    ip: str
    labels: dict[str, str]
    subdomain: str
    ready: bool
    terminating: bool
    ready_since: float


def names(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def selects(service: dict, pod: PodView) -> bool:
    selector = service.get("spec", {}).get("selector") or {}
    return bool(selector) and all(pod.labels.get(k) == v for k, v in selector.items())


def endpoints(service: dict, pods: Iterable[PodView]) -> list[PodView]:
    """The pods a Service's name resolves to, in the order they became ready."""
    spec = service.get("spec", {})
    not_ready_too = spec.get("publishNotReadyAddresses", False)
    chosen = [p for p in pods if selects(service, p) and not p.terminating and (p.ready or not_ready_too)]
    chosen.sort(key=lambda p: p.ready_since)
    if spec.get("clusterIP") != "None":
        chosen = chosen[:1]
    return chosen


def service_block(services: dict[str, dict], pods: list[PodView], namespace: str) -> str:
    lines = []
    for name in sorted(services):
        svc = services[name]
        eps = endpoints(svc, pods)
        lines += [f"{p.ip}\t{' '.join(names(name, namespace))}" for p in eps]
        if svc.get("spec", {}).get("clusterIP") == "None":
            lines += [f"{p.ip}\t{' '.join(names(f'{p.name}.{name}', namespace))}" for p in eps if p.subdomain == name]
    return "\n".join(lines) + "\n"


def hosts_file(pod: PodView, namespace: str, block: str) -> str:
    own = pod.name
    if pod.subdomain:
        own = f"{pod.name}.{pod.subdomain}.{namespace}.svc.cluster.local {pod.name}"
    return f"{HEADER}{pod.ip}\t{own}\n# Services\n{block}"


RESOLV_CONF = """# cluster test bed: names resolve from /etc/hosts only; no nameserver is reachable
search {ns}.svc.cluster.local svc.cluster.local cluster.local
options ndots:5 attempts:1 timeout:1
"""


def write_in_place(path: Path, text: str) -> bool:
    """Rewrite `path` keeping its inode (bind mounts of it stay valid); False if unchanged."""
    path.touch()
    with open(path, "r+") as f:
        if f.read() == text:
            return False
        f.seek(0)
        f.write(text)
        f.truncate()
    return True
