"""A real Prometheus (Debian package) scrapes local metrics processes; every PromQL query of
the Grafana dashboard and of the alert rules is evaluated through its HTTP API.

- Every dashboard query returns at least one series for the healthy deployment.
- Every metric selector inside an alert returns a series, every alert expression
  evaluates, and each alert fires for the failing run and for it only; Prometheus's own
  rule manager loads the rules (health "ok") and holds every alert pending or firing.
- promtool accepts the rules and the configurations.
"""
from __future__ import annotations

import subprocess
import time

import deploy_support as ds
import pytest

pytestmark = pytest.mark.slow


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ds.require_binary("promtool"), *args], capture_output=True, text=True, cwd=ds.ROOT)


def test_promtool_accepts_rules_and_configs():
    for path in (ds.ALERTS, ds.CHART / "files" / "instructrl-alerts.yaml"):
        out = _promtool("check", "rules", str(path))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "SUCCESS: 7 rules found" in out.stdout + out.stderr
    out = _promtool("check", "config", str(ds.ROOT / "deploy" / "prometheus" / "prometheus-local.yml"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_declarations_match_the_catalogue(metrics_targets, failing_metrics_targets):
    """The services' metric modules declare exactly docs/metrics.md (names, types, labels)."""
    report = failing_metrics_targets[0].report
    assert not report["mismatch"], report["mismatch"]
    assert not report["not_in_catalogue"], f"declared but not in docs/metrics.md: {report['not_in_catalogue']}"
    assert not report["import_errors"], report["import_errors"]


def test_real_services_are_scraped(prometheus, metrics_targets):
    catalogue = ds.catalogue_series_names()
    for job in (j for j in metrics_targets if not j.standin):
        assert prometheus.query(f'up{{job="{job.name}"}} == 1'), f"{job.name} is not up"
        # prometheus_client adds a *_created series per counter and histogram; not in the catalogue
        names = {s["metric"]["__name__"] for s in prometheus.query(f'{{job="{job.name}",__name__=~"instructrl_.+"}}')
                 if not s["metric"]["__name__"].endswith("_created")}
        assert names and names <= catalogue, f"{job.name}: {sorted(names - catalogue) or 'no instructrl metrics'}"
        moving = prometheus.query(f'sum(rate(instructrl_grpc_requests_total{{job="{job.name}",code="OK"}}[1m])) > 0')
        assert moving, f"{job.name} served no RPC"


def _healthy_namespaces(jobs) -> str:
    return "|".join(sorted({j.namespace for j in jobs}))


def test_every_dashboard_query_returns_a_series(prometheus, metrics_targets):
    namespaces = _healthy_namespaces(metrics_targets)
    empty = []
    queries = ds.dashboard_queries()
    for where, expr in queries:
        result = prometheus.query(ds.grafana_to_promql(expr, namespace=namespaces))
        if not result:
            empty.append(f"{where}: {expr}")
    assert not empty, f"{len(empty)}/{len(queries)} dashboard queries returned nothing:\n" + "\n".join(empty)
    # the dashboard's namespace variable: label_values(instructrl_learner_optimizer_step, namespace)
    assert {s["metric"].get("namespace") for s in prometheus.query("instructrl_learner_optimizer_step")} >= {"healthy"}


def _values(prometheus, query: str) -> dict:
    return {frozenset((k, v) for k, v in s["metric"].items() if k != "namespace"): float(s["value"][1])
            for s in prometheus.query(query)}


def test_run_wide_gauges_read_once_however_many_processes_export_them(prometheus, replicated_targets):
    """The same run seen through one process (namespace healthy) and through three processes
    exporting the same buffer gauges (namespace replicated): every dashboard query and the
    autoscaling query over those gauges read the same numbers (issue 13 bug 4)."""
    queries = [(where, ds.grafana_to_promql(expr, namespace="{ns}")) for where, expr in ds.dashboard_queries()
               if any(g in expr for g in ds.GLOBAL_GAUGES)]
    queries += [(f"adapter {m}", q) for m, q in ds.adapter_queries(namespace="{ns}")]
    assert len(queries) >= 5
    assert len(prometheus.query('instructrl_buffer_depth{namespace="replicated",stream="prompts"}')) == 3
    differ = []
    for where, query in queries:
        one = _values(prometheus, query.replace("{ns}", "healthy"))
        three = _values(prometheus, query.replace("{ns}", "replicated"))
        if not one or one != three:
            differ.append(f"{where}: one process {one}, three processes {three}")
    assert not differ, "\n".join(differ)


def test_every_alert_selector_returns_a_series(prometheus):
    empty = []
    for rule in ds.alert_rules():
        for selector in sorted(ds.vector_selectors(rule["expr"])):
            if not prometheus.query(selector):
                empty.append(f"{rule['alert']}: {selector}")
    assert not empty, "\n".join(empty)


def test_alerts_fire_for_the_failing_run_only(prometheus, metrics_targets, failing_metrics_targets):
    rules = ds.alert_rules()
    healthy = {j.namespace for j in metrics_targets}
    check_false_positives = all(j.steady for j in metrics_targets)
    problems: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        problems = []
        for rule in rules:
            namespaces = {s["metric"].get("namespace") for s in prometheus.query(rule["expr"])}
            if "failing" not in namespaces:
                problems.append(f"{rule['alert']} does not fire for the failing run")
            if check_false_positives and namespaces & healthy:
                problems.append(f"{rule['alert']} fires for the healthy run")
        loaded = {r["name"]: r for r in prometheus.rules() if r["type"] == "alerting"}
        for rule in rules:
            got = loaded.get(rule["alert"])
            if got is None or got["health"] != "ok":
                problems.append(f"{rule['alert']}: rule manager has {got and (got['health'], got.get('lastError'))}")
        active = {(a["labels"]["alertname"], a["labels"].get("namespace")) for a in prometheus.alerts()
                  if a["state"] in ("pending", "firing")}
        problems += [f"{r['alert']} is not pending/firing in Prometheus" for r in rules
                     if (r["alert"], "failing") not in active]
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not problems, "\n".join(problems)
