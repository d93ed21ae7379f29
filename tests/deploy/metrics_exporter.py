"""A metrics process for the Prometheus test: the services' real metric declarations, driven
through a scripted healthy or failing run.

    python tests/deploy/metrics_exporter.py --port 9123 --scenario healthy|failing

It imports the metric modules of the services (instructrl.serving.metrics, .serving.batcher,
.buffer.metrics, .rollout.metrics, .learner.metrics), so names, types and labels are the
ones the services export, and serves them with prometheus_client. STAND-IN: a catalogue
metric (docs/metrics.md) that no importable module declares is declared here from the
catalogue row, and listed as such on the first stdout line (a JSON report). Once the
services run locally, the `metrics_targets` fixture (tests/deploy/conftest.py) should point
Prometheus at them instead; this process then only plays the failing run that makes
every alert fire.

Values move one step per scrape (a collector registered last advances the script), so
the first scrape of the failing run sees a high reward and every later one a collapsed one.
The failing run's process has been "up" for an hour (its process_start_time_seconds is an
hour old), so the alerts that wait out a start-up window judge it as a run past start-up.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "true")

import deploy_support as ds  # noqa: E402
from prometheus_client import PROCESS_COLLECTOR, REGISTRY, Counter, Gauge, Histogram, start_http_server  # noqa: E402
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.metrics import MetricWrapperBase  # noqa: E402

MODULES = ("instructrl.serving.metrics", "instructrl.serving.batcher", "instructrl.buffer.metrics",
           "instructrl.rollout.metrics", "instructrl.learner.metrics")

LABEL_VALUES = {
    "service": ("rollout", "reward", "reference", "learner"),
    "replica": ("rollout-0", "rollout-1"),
    "stream": ("prompts", "experience"),
    "phase": ("generate", "train", "broadcast"),
    "code": ("OK", "UNAVAILABLE"),
    "reason": ("decode_error",),
}
METHODS = {"rollout": "Generate", "reward": "Score", "reference": "LogProbs", "learner": "GetStatus"}


def exposed_name(metric: MetricWrapperBase) -> str:
    name = metric._name  # noqa: SLF001 - prometheus_client keeps the family name here
    return name + "_total" if metric._type == "counter" else name  # noqa: SLF001


def find_metrics() -> tuple[dict[str, MetricWrapperBase], dict[str, str]]:
    """Metric objects declared by the services' modules, by exposed name; import errors."""
    found, errors = {}, {}
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 - a module still being written: use stand-ins
            errors[mod_name] = f"{type(e).__name__}: {e}"
            continue
        for value in vars(mod).values():
            candidates = value.values() if isinstance(value, dict) else [value]
            for m in candidates:
                if isinstance(m, MetricWrapperBase):
                    found[exposed_name(m)] = m
    return found, errors


def declare_standin(row: ds.CatalogueMetric) -> MetricWrapperBase:
    doc = f"STAND-IN from docs/metrics.md: {row.name}"
    if row.type == "counter":
        return Counter(row.name.removesuffix("_total"), doc, row.labels)
    if row.type == "gauge":
        return Gauge(row.name, doc, row.labels)
    return Histogram(row.name, doc, row.labels)


def children(metric: MetricWrapperBase, labels: tuple[str, ...], name: str):
    """(label dict, child) for every label combination the script uses."""
    if not labels:
        return [({}, metric)]
    combos = [{}]
    for label in labels:
        if label == "method":
            continue
        combos = [{**c, label: v} for c in combos for v in LABEL_VALUES.get(label, ("x",))]
    if "service" in labels and name.startswith("instructrl_batch"):
        combos = [c for c in combos if c["service"] in ("reward", "reference")]
    out = []
    for c in combos:
        if "method" in labels:
            c = {**c, "method": METHODS[c["service"]]}
        out.append((c, metric.labels(**{k: c[k] for k in labels})))
    return out


class Script:
    """The values of a healthy or a failing run, one step per scrape."""

    def __init__(self, metrics: dict[str, tuple[MetricWrapperBase, tuple[str, ...]]], failing: bool):
        self.metrics, self.failing, self.t = metrics, failing, 0
        self.lock = threading.Lock()
        self.step()

    def gauge(self, name: str, labels: dict) -> float:
        t, bad = self.t, self.failing
        stream = labels.get("stream")
        fixed = {
            "instructrl_learner_kl_to_ref": 80.0 if bad else 5.0,
            "instructrl_learner_rollout_replicas": 0.0 if bad else 2.0,
            "instructrl_learner_policy_version": 20.0 + t if bad else float(t),
            "instructrl_learner_optimizer_step": float(t),
            "instructrl_rollout_policy_version": 2.0 if bad else float(t),
            "instructrl_learner_score_mean": (5.0 if t == 0 else -5.0) if bad else 1.0 + 0.1 * t,
            "instructrl_learner_reward_mean": 0.5 + 0.1 * t,
            "instructrl_learner_kl_coef": 0.05,
            "instructrl_learner_entropy": 1.2,
            "instructrl_learner_clip_fraction": 0.12,
            "instructrl_learner_explained_variance": 0.6,
            "instructrl_learner_response_length_mean": 48.0,
            "instructrl_learner_advantage_std": 1.0,
            "instructrl_learner_tokens_per_second": 2000.0,
            "instructrl_buffer_depth": 10.0 if stream == "experience" else 100.0,
            "instructrl_buffer_consumer_lag": 5.0 if stream == "experience" else 50.0,
            "instructrl_buffer_pending": 2.0,
            "instructrl_rollout_requests_in_flight": 16.0,
            "instructrl_grpc_in_flight": 3.0,
        }
        return fixed.get(name, 0.25)

    def increment(self, name: str, labels: dict) -> float:
        bad = self.failing
        if name in ("instructrl_buffer_put_records_total", "instructrl_buffer_get_records_total"):
            return 0.0 if bad else 16.0
        if "failures" in name:
            return 1.0 if bad else 0.0
        if name == "instructrl_grpc_requests_total":
            return 10.0 if labels["code"] == "OK" else (10.0 if bad else 0.0)
        if name.endswith(("stale_dropped_total", "duplicates_total", "reclaimed_total")):
            return 0.0
        return 1000.0 if "bytes" in name or "tokens" in name else 4.0

    def observation(self, name: str) -> float:
        return {"instructrl_learner_policy_lag": 1.0, "instructrl_batch_size": 8.0}.get(
            name, 2.0 if "weight" in name else 0.02)

    def step(self) -> None:
        with self.lock:
            for name, (metric, labels) in self.metrics.items():
                for values, child in children(metric, labels, name):
                    kind = metric._type  # noqa: SLF001
                    if kind == "gauge":
                        child.set(self.gauge(name, values))
                    elif kind == "counter":
                        child.inc(self.increment(name, values))
                    elif kind == "histogram":
                        child.observe(self.observation(name))
            self.t += 1


class StartedAnHourAgo:
    """process_start_time_seconds of a process that has been up for an hour."""

    def __init__(self):
        self.start = time.time() - 3600

    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily("process_start_time_seconds", "Start time of the process since unix epoch "
                                "in seconds (failing run: up for an hour).", value=self.start)


class Ticker:
    """Registered last: each scrape advances the script after the metrics were read."""

    def __init__(self, script: Script):
        self.script = script

    def describe(self):
        return []

    def collect(self):
        self.script.step()
        return []


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--scenario", choices=("healthy", "failing"), required=True)
    args = p.parse_args()

    real, import_errors = find_metrics()
    catalogue = ds.load_catalogue()
    report = {"real": [], "standin": [], "import_errors": import_errors, "mismatch": [], "not_in_catalogue": []}
    driven = {}
    for name, row in catalogue.items():
        metric = real.get(name)
        if metric is None:
            metric = declare_standin(row)
            report["standin"].append(name)
        else:
            report["real"].append(name)
            got = (metric._type, tuple(metric._labelnames))  # noqa: SLF001
            if got != (row.type, row.labels):
                report["mismatch"].append(f"{name}: declared {got}, catalogue {(row.type, row.labels)}")
        driven[name] = (metric, tuple(metric._labelnames))  # noqa: SLF001
    report["not_in_catalogue"] = sorted(set(real) - set(catalogue))

    script = Script(driven, failing=args.scenario == "failing")
    if script.failing:
        REGISTRY.unregister(PROCESS_COLLECTOR)
        REGISTRY.register(StartedAnHourAgo())
    REGISTRY.register(Ticker(script))
    start_http_server(args.port, addr="127.0.0.1")
    print(json.dumps(report), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
