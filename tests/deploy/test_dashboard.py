"""The Grafana dashboard and the alert rules, statically: structure, metric names from the
catalogue (docs/metrics.md), the panels and alerts the operators rely on, runbook links,
and the chart's copies of both files."""
from __future__ import annotations

import re

import deploy_support as ds

REQUIRED_PANELS = {  # what an operator must see -> a metric its queries must use
    "reward": "instructrl_learner_reward_mean",
    "KL to SFT": "instructrl_learner_kl_to_ref",
    "kl_coef": "instructrl_learner_kl_coef",
    "entropy": "instructrl_learner_entropy",
    "clip fraction": "instructrl_learner_clip_fraction",
    "value loss": "instructrl_learner_value_loss",
    "tokens/s": "instructrl_rollout_generated_tokens_total",
    "buffer depth": "instructrl_buffer_depth",
    "buffer lag": "instructrl_buffer_consumer_lag",
    "policy staleness": "instructrl_rollout_policy_version",
    "weight-sync seconds": "instructrl_learner_weight_sync_seconds_bucket",
    "per-service latency": "instructrl_grpc_request_seconds_bucket",
    "per-service errors": "instructrl_grpc_requests_total",
}
REQUIRED_ALERTS = ("InstructrlKLBlowUp", "InstructrlRewardCollapse", "InstructrlBufferStalled",
                   "InstructrlNoRolloutReplica", "InstructrlWeightSyncFailing")


def test_dashboard_structure():
    dash = ds.dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["allValue"] == ".*"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
    for p in ds.dashboard_panels(dash):
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
            assert 'namespace=~"$namespace"' in t["expr"], f"{p['title']}: not filtered by $namespace"


def test_dashboard_uses_only_catalogue_metrics():
    known = ds.catalogue_series_names()
    dash = ds.dashboard()
    exprs = [e for _, e in ds.dashboard_queries(dash)]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    unknown = {n for e in exprs for n in ds.metric_names(e)} - known
    assert not unknown, f"not in docs/metrics.md: {sorted(unknown)}"


def test_dashboard_covers_the_catalogue_and_the_required_panels():
    used = set().union(*(ds.metric_names(e) for _, e in ds.dashboard_queries()))
    missing = [n for n, m in ds.load_catalogue().items() if not m.series_names() & used]
    assert not missing, f"catalogue metrics without a panel: {missing}"
    absent = {what: metric for what, metric in REQUIRED_PANELS.items() if metric not in used}
    assert not absent, absent
    errors = [e for _, e in ds.dashboard_queries() if "instructrl_grpc_requests_total" in e and 'code!="OK"' in e]
    assert errors, "no per-service error-rate query"


def test_alert_rules():
    rules = ds.alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(REQUIRED_ALERTS) <= set(names)
    known = ds.catalogue_series_names()
    operations = (ds.ROOT / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", operations, flags=re.M)}
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r.get("for"), f"{r['alert']} fires on a single evaluation"
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        unknown = ds.metric_names(r["expr"]) - known
        assert not unknown, f"{r['alert']}: {unknown}"
        for by in re.findall(r"\b(?:sum|max|min|avg|count)\s*(by\s*\([^)]*\))?\s*\(", r["expr"]):
            assert "namespace" in by, f"{r['alert']}: an aggregation drops the namespace (deployment)"
        link = r["annotations"]["runbook_url"]
        assert link.startswith(ds.RUNBOOK_BASE + "#") and link.split("#")[1] in anchors, link


def test_chart_ships_the_same_files():
    files = ds.CHART / "files"
    assert (files / "instructrl-dashboard.json").read_text() == ds.DASHBOARD.read_text(), \
        "copy deploy/grafana/instructrl.json to helm/instructrl/files/instructrl-dashboard.json"
    assert (files / "instructrl-alerts.yaml").read_text() == ds.ALERTS.read_text(), \
        "copy deploy/prometheus/instructrl-alerts.yaml to helm/instructrl/files/"


def test_run_wide_gauges_are_never_summed_over_processes():
    """instructrl_buffer_{depth,consumer_lag,pending} describe the run's Redis streams and may be
    exported by several processes of one run (issue 13 bug 4: every worker and the learner, so a
    sum read (replicas + 1) times the depth and the HPA fed on itself). Every dashboard query,
    alert and autoscaling query takes their max (or min) over a run's series first."""
    exprs = [(f"dashboard {w}", e) for w, e in ds.dashboard_queries()]
    exprs += [(f"alert {r['alert']}", r["expr"]) for r in ds.alert_rules()]
    exprs += [(f"adapter rule {m}", q) for m, q in ds.adapter_queries()]
    wrong, seen = [], 0
    for where, expr in exprs:
        for gauge in ds.GLOBAL_GAUGES:
            for agg in ds.enclosing_aggregations(expr, gauge):
                seen += 1
                if agg not in ("max", "min", "max_over_time", "min_over_time"):
                    wrong.append(f"{where}: {agg or 'bare'}({gauge}) in {expr}")
    assert seen >= 6, "the run-wide gauges are used somewhere"
    assert not wrong, "\n".join(wrong)
