"""The cluster in a box: every pod of a rendered chart as real processes on a simulated host.

    cluster = Cluster.from_chart(values, tmp_path, claims={"instructrl-models": models_dir})
    cluster.start()
    cluster.wait_ready("rollout")
    cluster.scale("rollout", 1); cluster.kill(pod); cluster.cut(pod); cluster.heal(pod)
    cluster.close()          # also at exit, and a crashed run's leftovers go at the next start

The controllers are reduced to what tests need: a Deployment or StatefulSet keeps `replicas`
pods (Deployment pods are named <name>-<template hash>-<5 chars>, StatefulSet pods <name>-<i>
with their stable claims); a deleted pod is replaced (a StatefulSet's once the old one is gone);
scaling down removes the pods a ReplicaSet would (not ready first, then the newest) or the
highest ordinals. DNS is dns.py; the kubelet is kubelet.py; the network is fabric.py.
"""
from __future__ import annotations

import atexit
import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from . import dns, probes
from .fabric import Fabric
from .images import Image, default_images, lookup
from .kubelet import Container, KubeletConfig, Pod
from .manifest import PodIdentity, Release, container_env, container_mounts, expand, pod_volumes

_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what Kubernetes uses in generated names


class ClusterError(AssertionError):
    """A wait timed out or a pod cannot run; the message ends with the pods' log tails."""


def _suffix(n: int, seed: str | None = None) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(_ALPHABET) for _ in range(n))


class Cluster:
    def __init__(self, objects: list[dict], workdir: Path, *, namespace: str = "ml",
                 claims: dict[str, Path] | None = None, images: dict[str, Image] | None = None,
                 kubelet: KubeletConfig | None = None, extra_env: dict[str, str] | None = None):
        self.release = Release(objects, namespace)
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.claims = {k: Path(v) for k, v in (claims or {}).items()}
        self.images = images if images is not None else default_images()
        self.kubelet = kubelet or KubeletConfig()
        # every container: gRPC resolves names with the system resolver, i.e. the pod's /etc/hosts
        self.extra_env = {"GRPC_DNS_RESOLVER": "native", **(extra_env or {})}
        self.replicas = {n: int(w["spec"].get("replicas", 1)) for n, w in self.release.workloads.items()}
        self.pods: dict[str, Pod] = {}
        self.history: list[Pod] = []
        self._lock = threading.RLock()
        self._closed = False
        self.fabric = Fabric()
        atexit.register(self.close)

    @classmethod
    def from_chart(cls, values: dict, workdir: Path, *, release: str = "rl", namespace: str = "ml",
                   **kw) -> Cluster:
        """Render helm/instructrl with the Helm SDK (tests/deploy's `render`) for `values`."""
        import deploy_support
        return cls(deploy_support.render(values, release=release, namespace=namespace).objects, workdir,
                   namespace=namespace, **kw)

    # -- controllers ------------------------------------------------------------------------------
    def start(self) -> Cluster:
        for name in self.release.workloads:
            self._reconcile(name)
        return self

    def _reconcile(self, workload: str) -> None:
        with self._lock:
            live = [p for p in self.pods.values() if p.workload == workload]
            kind = self.release.workloads[workload]["kind"]
            if kind == "StatefulSet":  # a name stays taken until its pod is gone
                taken = {int(p.name.rsplit("-", 1)[1]) for p in live}
                for i in range(self.replicas[workload]):
                    if i not in taken:
                        self._create_pod(workload, i)
            else:  # a ReplicaSet replaces a pod as soon as it is being deleted
                for _ in range(self.replicas[workload] - len([p for p in live if not p.terminating])):
                    self._create_pod(workload, None)

    def _create_pod(self, workload: str, ordinal: int | None) -> Pod:
        w = self.release.workloads[workload]
        template = w["spec"]["template"]
        labels = dict(template["metadata"].get("labels", {}))
        template_hash = _suffix(10, json.dumps(template, sort_keys=True))
        subdomain = ""
        if ordinal is None:
            name = f"{workload}-{template_hash}-{_suffix(5)}"
            labels["pod-template-hash"] = template_hash
        else:
            name = f"{workload}-{ordinal}"
            labels.update({"statefulset.kubernetes.io/pod-name": name, "apps.kubernetes.io/pod-index": str(ordinal),
                           "controller-revision-hash": f"{workload}-{template_hash}"})
            service = self.release.services.get(w["spec"].get("serviceName", ""))
            if service and service["spec"].get("clusterIP") == "None":
                subdomain = service["metadata"]["name"]
        host = self.fabric.add_host(name)
        pod_dir = self.workdir / "pods" / name
        pod_dir.mkdir(parents=True, exist_ok=True)
        spec = template["spec"]
        pod = Pod(name, workload, host, pod_dir, self._etc(host), float(spec.get("terminationGracePeriodSeconds", 30)),
                  self._on_change, labels, subdomain)
        identity = PodIdentity(name, self.namespace, str(uuid.uuid4()), host.ip, f"{self.fabric.token}-node",
                               self.fabric.node_ip, labels, dict(template["metadata"].get("annotations", {})), spec)
        volumes = pod_volumes(spec, pod_dir, self.release, self.claims, w["spec"].get("volumeClaimTemplates", []),
                              name, self.workdir / "claims")
        for c in spec["containers"]:
            image = lookup(self.images, c["image"])
            declared = container_env(c, identity, self.release)
            argv = [expand(a, declared.get) for a in image.argv(c.get("command"), c.get("args"))]
            env = {**image.env, **self.extra_env, **declared}
            pod.containers[c["name"]] = Container(pod, c, argv, env, c.get("workingDir", image.workdir),
                                                  container_mounts(c, volumes), self.kubelet)
        with self._lock:
            self.pods[name] = pod
            self.history.append(pod)
            self._update_dns()
        pod.event(f"scheduled on {host.ns} ({host.ip})")
        pod.start()
        return pod

    def _etc(self, host) -> Path:
        etc = Path("/etc/netns") / host.ns
        etc.mkdir(parents=True, exist_ok=True)
        dns.write_in_place(etc / "resolv.conf", dns.RESOLV_CONF.format(ns=self.namespace))
        return etc

    def _on_change(self, _pod: Pod) -> None:
        with self._lock:
            self._update_dns()

    def _update_dns(self) -> None:
        pods = list(self.pods.values())
        block = dns.service_block(self.release.services, pods, self.namespace)
        for p in pods:
            dns.write_in_place(p.netns_etc / "hosts", dns.hosts_file(p, self.namespace, block))

    # -- queries -----------------------------------------------------------------------------------
    def workload(self, suffix: str) -> str:
        """The full name of the workload called `suffix` or ending in `-suffix` ("rollout")."""
        return self.release.workload(suffix)["metadata"]["name"]

    def pods_of(self, workload: str) -> list[Pod]:
        """The workload's pods not being deleted, oldest first."""
        name = self.workload(workload)
        with self._lock:
            return sorted((p for p in self.pods.values() if p.workload == name and not p.terminating),
                          key=lambda p: p.created)

    def pod(self, name: str) -> Pod:
        with self._lock:
            return self.pods[name]

    def secret(self, name_suffix: str, key: str) -> str:
        found = [d for n, d in self.release.secrets.items() if n == name_suffix or n.endswith(f"-{name_suffix}")]
        assert len(found) == 1, f"expected one Secret *-{name_suffix}, found {sorted(self.release.secrets)}"
        return found[0][key].decode()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(p.log_tail(lines) for p in self.history)

    def wait_until(self, cond: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.5):
        """cond()'s first truthy value; ClusterError with every pod's log tail after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(poll_s)

    def wait_ready(self, workload: str, n: int | None = None, timeout_s: float = 300) -> list[Pod]:
        """Wait until `n` (default: the desired replicas) pods of the workload are ready."""
        want = self.replicas[self.workload(workload)] if n is None else n
        return self.wait_until(lambda: (lambda r: r if len(r) >= want else None)(
            [p for p in self.pods_of(workload) if p.ready]), timeout_s, f"{want} ready pod(s) of {workload}")

    # -- actions ---------------------------------------------------------------------------------
    def scale(self, workload: str, replicas: int) -> dict[str, float]:
        """Set the replicas; pods removed are deleted as the kubelet does (in parallel). Returns
        the seconds each removed pod took to terminate."""
        name = self.workload(workload)
        with self._lock:
            self.replicas[name] = replicas
            live = self.pods_of(name)
            if self.release.workloads[name]["kind"] == "StatefulSet":
                victims = sorted(live, key=lambda p: -int(p.name.rsplit("-", 1)[1]))
            else:
                victims = sorted(live, key=lambda p: (p.ready, -p.created))
            victims = victims[:max(0, len(live) - replicas)]
        took = self._delete(victims)
        self._reconcile(name)
        return took

    def delete_pod(self, name: str, grace_s: float | None = None) -> float:
        """`kubectl delete pod`: terminate it; its controller creates a replacement."""
        pod = self.pod(name)
        pod.terminating = True
        self._reconcile(pod.workload)
        took = self._delete([pod], grace_s)[name]
        self._reconcile(pod.workload)
        return took

    def _delete(self, pods: list[Pod], grace_s: float | None = None) -> dict[str, float]:
        took: dict[str, float] = {}

        def one(p: Pod) -> None:
            took[p.name] = p.terminate(grace_s)
            with self._lock:
                self.pods.pop(p.name, None)
                self._update_dns()
            self.fabric.remove_host(p.name)
        threads = [threading.Thread(target=one, args=(p,)) for p in pods]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return took

    def kill(self, name: str, container: str | None = None) -> None:
        """SIGKILL a container (every container of the pod when None); the kubelet restarts it."""
        self.pod(name).kill(container)

    def cut(self, name: str) -> None:
        self.pod(name).event("link cut (test)")
        self.fabric.cut(self.pod(name).host.name)

    def heal(self, name: str) -> None:
        self.pod(name).event("link healed (test)")
        self.fabric.heal(self.pod(name).host.name)

    def exec(self, name: str, container: str, argv: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        """`kubectl exec`: run argv in the container, with its environment."""
        c = self.pod(name).containers[container]
        return probes.exec_in(c.pid1, argv, c.env, timeout_s)

    def close(self) -> None:
        """Stop every pod (2 s grace), delete every namespace, link and hosts file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._lock:
                pods = list(self.pods.values())
            self._delete(pods, grace_s=2.0)
        finally:
            self.fabric.close()
            atexit.unregister(self.close)
