"""The network of the cluster test bed: one Linux network namespace per pod ("host").

    fabric namespace  <token>-fabric:  bridge br0, one port per pod (<token>b<i>)
    pod namespace     <token>-<pod>:   eth0  10.X.Y.i/24, on the bridge (the pod network)
                                       kl0   point-to-point link to the machine (the kubelet's
                                             path: probes, test clients), route <node>/32
    host namespace:                    <token>k<i> with the node address <node>/32 and a route
                                       <pod ip>/32 per pod; no route to the subnet as a whole

Pods talk to each other over the bridge only; `cut` takes a pod's bridge port down (and `heal`
brings it up) exactly like a partition of its host. The kubelet link is not cut: like a
kubelet on the pod's own node, the bed still probes and observes a partitioned pod.

Each run takes its own /24 (10.200-250.X.0/24, not one in use on this machine nor by
another live run) and a token `icb<5 hex>` that prefixes every namespace and link it
creates. /run/instructrl-cluster-bed/<token> records the owning process, so that
`remove_leftovers` deletes what a crashed run left behind and never what a live one holds.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "icb"
REGISTRY = Path("/run/instructrl-cluster-bed")
NETNS_ETC = Path("/etc/netns")


class FabricError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS...`; raise FabricError with its stderr when it fails."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise FabricError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def netns_names() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def kill_netns_processes(ns: str) -> None:
    """SIGKILL every process inside network namespace `ns` (all of them were started by a bed)."""
    for _ in range(50):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def delete_netns(ns: str) -> None:
    kill_netns_processes(ns)
    ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def _owner_alive(record: dict) -> bool:
    try:
        stat = Path(f"/proc/{record['pid']}/stat").read_text()
    except (OSError, KeyError):
        return False
    return stat.split()[21] == str(record.get("start_ticks"))


def remove_leftovers() -> list[str]:
    """Delete the namespaces, /etc/netns entries, host links and processes of earlier runs whose
    owner is gone (a crashed or killed test session). Returns the tokens removed."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    live = set()
    for f in REGISTRY.iterdir():
        try:
            record = json.loads(f.read_text())
        except (OSError, ValueError):
            record = {}
        if _owner_alive(record):
            live.add(f.name)
    removed = set()
    for ns in netns_names():
        token = ns.split("-", 1)[0]
        if ns.startswith(PREFIX) and token not in live:
            delete_netns(ns)
            removed.add(token)
    for d in NETNS_ETC.glob(f"{PREFIX}*") if NETNS_ETC.exists() else []:
        if d.name.split("-", 1)[0] not in live:
            shutil.rmtree(d, ignore_errors=True)
    for line in ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and name[:8] not in live:
            ip("link", "del", name, check=False)
            removed.add(name[:8])
    for f in REGISTRY.iterdir():
        if f.name not in live:
            f.unlink(missing_ok=True)
            removed.add(f.name)
    return sorted(removed)


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in ip("-4", "-o", "addr", "show").splitlines() + ip("-4", "route", "show").splitlines():
        for word in line.split():
            try:
                nets.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass
    for f in REGISTRY.glob(f"{PREFIX}*"):
        try:
            nets.append(ipaddress.ip_network(json.loads(f.read_text())["subnet"]))
        except (OSError, ValueError, KeyError):
            pass
    return nets


@dataclasses.dataclass
class Host:
    """One pod's network namespace."""

    name: str           # the pod's name
    ns: str             # its network namespace
    ip: str             # its address on the pod network (eth0)
    bridge_port: str    # its port on the bridge, in the fabric namespace
    kubelet_link: str   # host side of its kubelet link


class Fabric:
    """The bridge and the pods' namespaces of one run. Use as a context manager, or call close()."""

    def __init__(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        used = _subnets_in_use()
        for _ in range(1000):
            self.token = f"{PREFIX}{random.randrange(16 ** 5):05x}"
            net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
            if not (REGISTRY / self.token).exists() and not any(net.overlaps(u) for u in used):
                break
        else:
            raise FabricError("no free 10.200-250.x.0/24 subnet")
        self.subnet = net
        self.node_ip = str(net.network_address + 1)
        self._next = 2
        self.hosts: dict[str, Host] = {}
        start = Path("/proc/self/stat").read_text().split()[21]
        # the owner record first: a concurrent remove_leftovers() must never see our namespaces unowned
        (REGISTRY / self.token).write_text(json.dumps({"pid": os.getpid(), "start_ticks": start,
                                                       "subnet": str(net)}))
        self.ns = f"{self.token}-fabric"
        try:
            ip("netns", "add", self.ns)
            ip("-n", self.ns, "link", "add", "br0", "type", "bridge")
            ip("-n", self.ns, "link", "set", "br0", "up")
        except FabricError:
            self.close()
            raise

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace for pod `name`, on the bridge and reachable from this machine."""
        i = self._next
        self._next += 1
        if i >= self.subnet.num_addresses - 1:
            raise FabricError(f"subnet {self.subnet} is full")
        addr = str(self.subnet.network_address + i)
        h = Host(name, f"{self.token}-{name}", addr, f"{self.token}b{i}", f"{self.token}k{i}")
        self.hosts[name] = h
        pod_end, node_end = f"{self.token}c{i}", f"{self.token}l{i}"
        ip("netns", "add", h.ns)
        # pod network: eth0 on the bridge
        ip("link", "add", h.bridge_port, "netns", self.ns, "type", "veth", "peer", "name", pod_end, "netns", h.ns)
        ip("-n", self.ns, "link", "set", h.bridge_port, "master", "br0", "up")
        ip("-n", h.ns, "link", "set", pod_end, "name", "eth0")
        ip("-n", h.ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", h.ns, "link", "set", "eth0", "up")
        ip("-n", h.ns, "link", "set", "lo", "up")
        # kubelet link: this machine <-> the pod, outside the bridge
        ip("link", "add", h.kubelet_link, "type", "veth", "peer", "name", node_end, "netns", h.ns)
        ip("-n", h.ns, "link", "set", node_end, "name", "kl0")
        ip("-n", h.ns, "link", "set", "kl0", "up")
        ip("-n", h.ns, "route", "add", f"{self.node_ip}/32", "dev", "kl0", "src", addr)
        ip("addr", "add", f"{self.node_ip}/32", "dev", h.kubelet_link)
        ip("link", "set", h.kubelet_link, "up")
        ip("route", "add", f"{addr}/32", "dev", h.kubelet_link, "src", self.node_ip)
        (NETNS_ETC / h.ns).mkdir(parents=True, exist_ok=True)
        return h

    def remove_host(self, name: str) -> None:
        """Kill whatever still runs in the pod's namespace, then delete it and its links."""
        h = self.hosts.pop(name, None)
        if h is not None:
            # the kernel destroys a deleted namespace's veth pairs asynchronously, so this machine's end
            # of the kubelet link could outlive the namespace: delete the pair first (synchronous)
            kill_netns_processes(h.ns)
            ip("link", "del", h.kubelet_link, check=False)
            delete_netns(h.ns)

    def cut(self, name: str) -> None:
        """Partition pod `name` from every other pod (its bridge port goes down)."""
        ip("-n", self.ns, "link", "set", self.hosts[name].bridge_port, "down")

    def heal(self, name: str) -> None:
        ip("-n", self.ns, "link", "set", self.hosts[name].bridge_port, "up")

    def close(self) -> None:
        for name in list(self.hosts):
            self.remove_host(name)
        delete_netns(self.ns)
        (REGISTRY / self.token).unlink(missing_ok=True)
