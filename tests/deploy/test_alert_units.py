"""The alert rules' behaviour over time, with promtool's rule unit tests
(tests/deploy/promtool/instructrl-alerts-test.yaml; issue 13 bug 8): a pipeline that never
started is a stalled buffer; a normal start whose model load takes longer than the `for:`
window, or a learner restart, is not "no rollout replica"."""
from __future__ import annotations

import subprocess

import deploy_support as ds
import yaml


def test_promtool_rule_unit_tests_pass():
    out = subprocess.run([ds.require_binary("promtool"), "test", "rules", str(ds.ALERT_UNIT_TESTS)],
                         capture_output=True, text=True, cwd=ds.ALERT_UNIT_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_unit_tests_cover_both_alerts_firing_and_not():
    doc = yaml.safe_load(ds.ALERT_UNIT_TESTS.read_text())
    (rules,) = doc["rule_files"]
    assert (ds.ALERT_UNIT_TESTS.parent / rules).resolve() == ds.ALERTS.resolve()
    seen = {}
    for test in doc["tests"]:
        for check in test["alert_rule_test"]:
            seen.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    assert seen["InstructrlBufferStalled"] == {True, False}, seen
    assert seen["InstructrlNoRolloutReplica"] == {True, False}, seen


def test_every_alert_links_its_runbook_and_the_chart_can_rebase_the_links():
    r = ds.render({"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example.com/ops/"}}})
    rules = [x for g in r.get("PrometheusRule", "rl-instructrl")["spec"]["groups"] for x in g["rules"]]
    assert len(rules) == len(ds.alert_rules())
    for rule in rules:
        assert rule["annotations"]["runbook_url"] == f"https://wiki.example.com/ops#{rule['alert'].lower()}"
