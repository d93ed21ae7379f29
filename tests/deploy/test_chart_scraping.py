"""Every process that serves /metrics is scraped exactly once, and nothing else is (issue 13
bug 3: learner ranks > 0 serve no /metrics but were scraped, a permanent TargetDown), with the
Prometheus operator (ServiceMonitor) and with annotation-based discovery."""
from __future__ import annotations

import deploy_support as ds
import pytest
import scrape_plan
import yaml

METRICS, WORKER_METRICS = 9090, 9091


def _expected(r: ds.Rendered) -> set[tuple[str, int]]:
    """(pod, port) of every process that serves /metrics: every rollout, reward and reference
    pod on 9090 (+ 9091 for the rollout worker), and learner rank 0 only."""
    out = set()
    for pod in scrape_plan.pods(r):
        if pod.component == "redis":
            continue
        if pod.component == "learner" and not pod.name.endswith("-learner-0"):
            continue
        out.add((pod.name, METRICS))
        if dict(pod.ports).get("worker-metrics"):
            out.add((pod.name, WORKER_METRICS))
    return out


@pytest.mark.parametrize("ranks", [1, 4])
def test_servicemonitor_scrapes_each_metrics_server_once(ranks):
    values = {"learner": {"ranks": ranks, "checkpoints": {"existingClaim": "ckpt"}},
              "metrics": {"serviceMonitor": {"enabled": True}}}
    r = ds.render(values)
    targets = scrape_plan.servicemonitor_targets(r)
    ports = {"metrics": METRICS, "worker-metrics": WORKER_METRICS}
    got = {(pod, ports[port]) for pod, port in targets}
    assert got == _expected(r), sorted(got ^ _expected(r))
    assert set(targets.values()) == {1}, {k: v for k, v in targets.items() if v != 1}


@pytest.mark.parametrize("ranks", [1, 4])
def test_annotation_discovery_scrapes_each_metrics_server_once(ranks):
    r = ds.render({"learner": {"ranks": ranks, "checkpoints": {"existingClaim": "ckpt"}}})
    targets = scrape_plan.annotation_targets(r)
    assert set(targets) == _expected(r), sorted(set(targets) ^ _expected(r))
    assert set(targets.values()) == {1}, {k: v for k, v in targets.items() if v != 1}
    sts = r.get("StatefulSet", "-learner")
    annotated = "prometheus.io/scrape" in sts["spec"]["template"]["metadata"]["annotations"]
    assert annotated == (ranks == 1), "a multi-rank learner's pods must not ask to be scraped"


def test_the_kubernetes_prometheus_config_has_the_service_job():
    """prometheus-kubernetes.yml discovers what annotation_targets assumes: annotated pods,
    worker-metrics container ports, and pods behind annotated Services."""
    conf = yaml.safe_load((ds.ROOT / "deploy" / "prometheus" / "prometheus-kubernetes.yml").read_text())
    roles = {j["job_name"]: j["kubernetes_sd_configs"][0]["role"] for j in conf["scrape_configs"]}
    assert sorted(roles.values()) == ["endpoints", "pod", "pod"], roles
    endpoints = next(j for j in conf["scrape_configs"] if j["kubernetes_sd_configs"][0]["role"] == "endpoints")
    keeps = {tuple(x["source_labels"]): x["regex"] for x in endpoints["relabel_configs"] if x.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_service_annotation_prometheus_io_scrape",)] == "true"
    assert keeps[("__meta_kubernetes_endpoint_port_name",)] == "metrics"
