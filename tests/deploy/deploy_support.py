"""Helpers of the deployment tests: paths, the metrics catalogue, chart rendering, PromQL.

Kept out of conftest.py so fixtures stay short. The tools these tests drive are real:
Helm's Go SDK (PyPI helm-python-sdk), the Kubernetes OpenAPI schemas (PyPI
kubernetes-validate), Prometheus and promtool (Debian package `prometheus`). A missing
tool fails the test with what to install; it never skips.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "instructrl"
CATALOGUE = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "instructrl.json"
ALERTS = ROOT / "deploy" / "prometheus" / "instructrl-alerts.yaml"
PROMETHEUS_EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOCKER = ROOT / "deploy" / "docker"

PIP_HINT = "pip install -r scripts/deploy_requirements.txt (scripts/setup.sh does it)"
APT_HINT = "apt-get install prometheus (Debian; scripts/setup_system.sh does it)"

def kube_floor() -> str:
    """The oldest Kubernetes version Chart.yaml's kubeVersion (">=X.Y.Z-0") admits."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", constraint.strip())
    assert m, f"Chart.yaml kubeVersion {constraint!r}: only '>=X.Y.Z-0' is understood here"
    return m.group(1)


def _admitted_kube_versions() -> tuple[str, ...]:
    """Every Kubernetes version whose OpenAPI schemas kubernetes-validate ships and that the
    chart's kubeVersion admits: each object must validate on each of them."""
    try:
        from kubernetes_validate.utils import all_versions
    except ImportError:  # the tests that need it fail with the install hint
        return ("1.37.0",)
    key = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    return tuple(sorted({v for v in all_versions() if key(v) >= key(kube_floor())}, key=key))


KUBE_VERSIONS = _admitted_kube_versions()


def require_module(name: str):
    """Import a Python tool the deployment tests need, or fail naming the install."""
    try:
        return __import__(name)
    except ImportError as err:
        pytest.fail(f"{name} is not installed ({err}): {PIP_HINT}", pytrace=False)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: {APT_HINT}", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the metrics catalogue (docs/metrics.md) -------------------------------------------

@dataclass(frozen=True)
class CatalogueMetric:
    name: str            # as exposed: counters end in _total
    type: str            # counter | gauge | histogram
    labels: tuple[str, ...]

    def series_names(self) -> set[str]:
        """Names a PromQL query may use for this metric."""
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


_ROW = re.compile(r"^\|\s*`(instructrl_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|([^|]*)\|")


def load_catalogue(path: Path = CATALOGUE) -> dict[str, CatalogueMetric]:
    out: dict[str, CatalogueMetric] = {}
    for line in path.read_text().splitlines():
        m = _ROW.match(line.strip())
        if m:
            labels = tuple(x.strip() for x in m.group(3).split(",") if x.strip())
            out[m.group(1)] = CatalogueMetric(m.group(1), m.group(2), labels)
    assert out, f"no metric rows found in {path}"
    return out


def catalogue_series_names() -> set[str]:
    return set().union(*(m.series_names() for m in load_catalogue().values()))


# --- PromQL found in the dashboard and the rules ----------------------------------------

_METRIC = re.compile(r"\b(instructrl_[a-z0-9_]+)\b")
# instructrl metrics, and the process collector's start time (prometheus_client exports it
# from every service process) that the alerts read a process's up-time from.
_SELECTOR = re.compile(r"\b(instructrl_[a-z0-9_]+|process_start_time_seconds)(\{[^}]*\})?")


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def vector_selectors(expr: str) -> set[str]:
    """`metric{matchers}` strings of an expression (label names never start with instructrl_);
    the metrics are the instructrl_* ones and process_start_time_seconds."""
    return {name + (matchers or "") for name, matchers in _SELECTOR.findall(expr)}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dash: dict | None = None) -> list[dict]:
    """Every non-row panel, including those nested in collapsed rows."""
    dash = dash or dashboard()
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_queries(dash: dict | None = None) -> list[tuple[str, str]]:
    """(panel title + refId, expr) of every target."""
    return [(f"{p['title']} [{t['refId']}]", t["expr"])
            for p in dashboard_panels(dash) for t in p.get("targets", [])]


def grafana_to_promql(expr: str, namespace: str = ".*") -> str:
    """Replace the dashboard's template variables as Grafana would."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            .replace("$__range", "1h").replace("$namespace", namespace)
            .replace("${namespace}", namespace))


# Gauges that describe a whole run (one Redis stream), not the process exporting them: more
# than one process of a run may export them (docs/metrics.md), so every query takes their max
# over a run's series, never the sum.
GLOBAL_GAUGES = ("instructrl_buffer_depth", "instructrl_buffer_consumer_lag", "instructrl_buffer_pending")
ADAPTER_VALUES = ROOT / "deploy" / "prometheus" / "prometheus-adapter-values.yaml"


def enclosing_aggregations(expr: str, metric: str) -> list[str]:
    """For each use of `metric` in `expr`, the name of the innermost function or aggregation
    applied to it ("" when the selector stands bare)."""
    out = []
    for m in re.finditer(rf"\b{metric}\b", expr):
        depth, i = 0, m.start() - 1
        while i >= 0:
            if expr[i] == ")":
                depth += 1
            elif expr[i] == "(":
                if depth == 0:
                    break
                depth -= 1
            i -= 1
        head = expr[:i].rstrip() if i >= 0 else ""
        head = re.sub(r"\s*\b(by|without)\s*\([^)]*\)\s*$", "", head)
        name = re.search(r"([a-z_]+)\s*$", head) if i >= 0 else None
        out.append(name.group(1) if name else "")
    return out


def adapter_queries(namespace: str = "ml", selector: str = 'stream="prompts"') -> list[tuple[str, str]]:
    """(metric, PromQL) of the prometheus-adapter external rules we ship, templated as the
    adapter does for an HPA in `namespace` whose metric selector is `selector`."""
    doc = yaml.safe_load(ADAPTER_VALUES.read_text())
    out = []
    for rule in doc["rules"]["external"]:
        metric = rule["name"]["matches"].strip("^$")
        query = (rule["metricsQuery"].replace("<<.Series>>", metric).replace("<<.GroupBy>>", "namespace")
                 .replace("<<.LabelMatchers>>", f'{selector},namespace="{namespace}"'))
        out.append((metric, query))
    return out


# Where every alert's runbook_url points (deploy/prometheus/instructrl-alerts.yaml); the chart
# replaces this base with metrics.prometheusRule.runbookBaseUrl when set.
RUNBOOK_BASE = "https://github.com/instructrl/instructrl/blob/main/docs/operations.md"
ALERT_UNIT_TESTS = ROOT / "tests" / "deploy" / "promtool" / "instructrl-alerts-test.yaml"


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


# --- chart rendering ---------------------------------------------------------------------

@dataclass
class Rendered:
    """One render of the chart: its Kubernetes objects and NOTES.txt."""

    objects: list[dict]
    notes: str
    files: dict[str, str] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, suffix: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"expected one {kind} named *{suffix}, found {[o['metadata']['name'] for o in found]}"
        return found[0]


def render(values: dict | None = None, release: str = "rl", namespace: str = "ml") -> Rendered:
    helm = require_module("helm_python")
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=release, namespace=namespace, is_install=True)
    objects: list[dict] = []
    notes = ""
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return Rendered(objects, notes, files)


def ci_values() -> dict[str, dict]:
    """The scenario values files under helm/instructrl/ci/ (plus the defaults, as {})."""
    out = {"default": {}}
    for f in sorted((CHART / "ci").glob("*-values.yaml")):
        out[f.name.removesuffix("-values.yaml")] = yaml.safe_load(f.read_text()) or {}
    return out


def server_container(r: Rendered, role: str) -> dict:
    """The gRPC server container of a role."""
    kind = "StatefulSet" if role == "learner" else "Deployment"
    return containers(r.get(kind, f"-{role}"))[role]


def containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}
