"""What the chart decides from the cluster it is installed into, through Helm's Go SDK against a
stand-in API server (fake_kube_api.py): Chart.yaml's kubeVersion gate, and the generated Redis
password and token kept across upgrades by `lookup` of the existing Secrets (issue 15 item 6)."""
from __future__ import annotations

import base64

import deploy_support as ds
import pytest
from fake_kube_api import FakeKubeAPI

TOKEN = {"auth": {"token": {"enabled": True}}}


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _secrets(files: dict[str, str]) -> dict[str, dict[str, str]]:
    import yaml
    out = {}
    for path, text in files.items():
        if path.endswith("secrets.yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    out[doc["metadata"]["name"]] = {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
    return out


def _render_against(api: FakeKubeAPI, values: dict) -> dict[str, dict[str, str]]:
    helm = ds.require_module("helm_python")
    with helm.Config(namespace="ml", kubeconfig_content=api.kubeconfig()) as cfg, \
            helm.Chart.load(str(ds.CHART)) as chart:
        return _secrets(cfg.render(chart, values, name="rl", namespace="ml", is_upgrade=True))


def test_upgrade_keeps_the_generated_redis_password_and_token():
    existing = {("ml", "rl-instructrl-redis"): {"data": {"password": _b64("kept-redis-password"),
                                                          "url": _b64("redis://rl-instructrl-redis.ml.svc:6379/0")}},
                ("ml", "rl-instructrl-token"): {"data": {"token": _b64("kept-token")}}}
    with FakeKubeAPI(secrets=existing) as api:
        first = _render_against(api, TOKEN)
        second = _render_against(api, TOKEN)
        assert "/api/v1/namespaces/ml/secrets/rl-instructrl-redis" in api.requests
    for s in (first, second):
        assert s["rl-instructrl-redis"]["password"] == "kept-redis-password"
        assert s["rl-instructrl-token"]["token"] == "kept-token"


def test_first_install_generates_and_given_values_win():
    with FakeKubeAPI() as api:  # no Secrets yet
        a, b = _render_against(api, TOKEN), _render_against(api, TOKEN)
    assert len(a["rl-instructrl-redis"]["password"]) == 32 and len(a["rl-instructrl-token"]["token"]) == 48
    assert a["rl-instructrl-redis"]["password"] != b["rl-instructrl-redis"]["password"]  # why lookup matters
    existing = {("ml", "rl-instructrl-redis"): {"data": {"password": _b64("old")}}}
    values = {"redis": {"bundled": {"password": "chosen"}}, "auth": {"token": {"enabled": True, "value": "mine"}}}
    with FakeKubeAPI(secrets=existing) as api:
        s = _render_against(api, values)
    assert s["rl-instructrl-redis"]["password"] == "chosen" and s["rl-instructrl-token"]["token"] == "mine"


@pytest.mark.parametrize("version,admitted", [("1.28.0", False), ("1.29.0", True), ("1.37.0", True)])
def test_install_checks_the_cluster_version(version, admitted):
    helm = ds.require_module("helm_python")
    with FakeKubeAPI(version=version) as api:
        with helm.Config(namespace="ml", kubeconfig_content=api.kubeconfig()) as cfg, \
                helm.Chart.load(str(ds.CHART)) as chart:
            try:
                cfg.install(chart, "rl", {}, namespace="ml", dry_run="server")
                message = ""
            except helm.HelmError as e:  # past the gate the stand-in cannot serve Helm's OpenAPI download
                message = str(e)
    refused = "chart requires kubeVersion: >=1.29.0-0" in message
    assert refused != admitted, message
