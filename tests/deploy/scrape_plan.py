"""Which pods of a rendered chart Prometheus scrapes, and on which port, as the two scraping
setups the chart supports would discover them:

- the Prometheus operator: the ServiceMonitor's Services, each endpoint port on the pods the
  Service selects (`servicemonitor_targets`);
- annotation-based discovery (deploy/prometheus/prometheus-kubernetes.yml): pods annotated
  prometheus.io/scrape on their annotated port, containers' `worker-metrics` ports, and pods
  behind Services annotated prometheus.io/scrape (`annotation_targets`).

Pods are expanded from the workloads as the controllers would name and label them: a
StatefulSet's pod i gets `statefulset.kubernetes.io/pod-name: <name>-i` and
`apps.kubernetes.io/pod-index: "i"`; a Deployment gets `replicas` (or 2) pods.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import deploy_support as ds


@dataclass(frozen=True)
class Pod:
    name: str
    component: str
    labels: tuple
    annotations: tuple
    ports: tuple      # (name, containerPort)

    def label_map(self) -> dict:
        return dict(self.labels)


def pods(r: ds.Rendered) -> list[Pod]:
    out = []
    for w in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        tpl = w["spec"]["template"]
        labels = dict(tpl["metadata"]["labels"])
        annotations = tuple(sorted(tpl["metadata"].get("annotations", {}).items()))
        ports = tuple((p["name"], p["containerPort"]) for c in tpl["spec"]["containers"] for p in c.get("ports", []))
        n = w["spec"].get("replicas", 2)
        for i in range(n):
            name = f"{w['metadata']['name']}-{i}"
            extra = {}
            if w["kind"] == "StatefulSet":
                extra = {"statefulset.kubernetes.io/pod-name": name, "apps.kubernetes.io/pod-index": str(i)}
            out.append(Pod(name, labels["app.kubernetes.io/component"], tuple(sorted({**labels, **extra}.items())),
                           annotations, ports))
    return out


def _selects(selector: dict, pod: Pod) -> bool:
    return bool(selector) and selector.items() <= pod.label_map().items()


def servicemonitor_targets(r: ds.Rendered) -> Counter:
    """(pod, port name) -> how many times the ServiceMonitor scrapes it."""
    out: Counter = Counter()
    for sm in r.of_kind("ServiceMonitor"):
        match = sm["spec"]["selector"]["matchLabels"]
        ports = [e["port"] for e in sm["spec"]["endpoints"]]
        for svc in r.of_kind("Service"):
            if not match.items() <= svc["metadata"].get("labels", {}).items():
                continue
            svc_ports = {p["name"] for p in svc["spec"]["ports"]}
            for pod in pods(r):
                if _selects(svc["spec"].get("selector", {}), pod):
                    for port in ports:
                        if port in svc_ports:
                            out[(pod.name, port)] += 1
    return out


def annotation_targets(r: ds.Rendered) -> Counter:
    """(pod, port number) -> scrapes by the three jobs of prometheus-kubernetes.yml."""
    out: Counter = Counter()
    all_pods = pods(r)
    for pod in all_pods:
        ann = dict(pod.annotations)
        if ann.get("prometheus.io/scrape") == "true":
            out[(pod.name, int(ann["prometheus.io/port"]))] += 1
        for name, number in pod.ports:
            if name == "worker-metrics":
                out[(pod.name, number)] += 1
    for svc in r.of_kind("Service"):
        ann = svc["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true":
            continue
        port = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
        for pod in all_pods:
            if _selects(svc["spec"].get("selector", {}), pod):
                out[(pod.name, dict(pod.ports)[port["targetPort"]])] += 1
    return out
