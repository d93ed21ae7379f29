"""A small evaluator of NetworkPolicy semantics, to test who may talk to whom.

Follows the networking.k8s.io/v1 rules: a pod selected by no policy of a direction is
open in that direction; otherwise traffic passes when one rule of one selecting policy
admits the peer and the port. Peers here are pods (ipBlock never matches a pod).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    labels: dict
    namespace: str = "ml"
    ports: dict = field(default_factory=dict)  # container port name -> number

    @property
    def ns_labels(self) -> dict:
        return {"kubernetes.io/metadata.name": self.namespace}


def selects(selector: dict | None, labels: dict) -> bool:
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        value, op = labels.get(e["key"]), e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and value in e["values"]:
            return False
        if op == "Exists" and e["key"] not in labels:
            return False
        if op == "DoesNotExist" and e["key"] in labels:
            return False
    return True


def _peer_matches(peer: dict, other: Pod, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.ns_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return selects(peer.get("podSelector"), other.labels) if "podSelector" in peer else True


def _port_matches(ports: list | None, port: int, target: Pod) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = target.ports.get(want)
        if want == port or (p.get("endPort") and want <= port <= p["endPort"]):
            return True
    return False


def _allowed(policies: list[dict], subject: Pod, other: Pod, port: int, direction: str,
             port_owner: Pod) -> bool:
    kind = "Ingress" if direction == "ingress" else "Egress"
    peers_key = "from" if direction == "ingress" else "to"
    selecting = [p for p in policies
                 if p["metadata"].get("namespace", "ml") == subject.namespace
                 and selects(p["spec"]["podSelector"], subject.labels)
                 and kind in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get(direction) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(x, other, pol["metadata"].get("namespace", "ml")) for x in peers):
                continue
            if _port_matches(rule.get("ports"), port, port_owner):
                return True
    return False


def allowed(policies: list[dict], src: Pod, dst: Pod, port: int) -> bool:
    """May `src` open a TCP connection to `dst` on `port` (egress of src and ingress of dst)?"""
    return (_allowed(policies, src, dst, port, "egress", dst)
            and _allowed(policies, dst, src, port, "ingress", dst))
