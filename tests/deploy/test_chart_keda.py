"""The KEDA redis-streams trigger watches the run's Redis as the programs reach it: the same
host, database, TLS and credentials (issue 13 bug 5: with an external rediss://.../2 URL
KEDA watched database 0, without the user name or the CA)."""
from __future__ import annotations

import base64

import deploy_support as ds
import pytest

KEDA = {"rollout": {"autoscaling": {"keda": {"enabled": True}}}}


def _external(url: str, **keda) -> dict:
    return {"redis": {"mode": "external", "external": {"url": url}},
            "rollout": {"autoscaling": {"keda": {"enabled": True, **keda}}}}


def _trigger(r: ds.Rendered) -> dict:
    return r.get("ScaledObject", "-rollout")["spec"]["triggers"][0]["metadata"]


def _auth(r: ds.Rendered) -> dict[str, tuple[str, str]]:
    found = r.of_kind("TriggerAuthentication")
    if not found:
        return {}
    return {x["parameter"]: (x["name"], x["key"]) for x in found[0]["spec"]["secretTargetRef"]}


def _secret(r: ds.Rendered, name: str) -> dict[str, str]:
    s = next(s for s in r.of_kind("Secret") if s["metadata"]["name"] == name)
    return {k: base64.b64decode(v).decode() for k, v in s["data"].items()}


def test_external_url_gives_address_database_tls_and_credentials(rendered):
    """helm/instructrl/ci/external-redis-values.yaml: rediss://rl-worker:s3cret@host:6380/2."""
    r = rendered["external-redis"]
    trigger = _trigger(r)
    assert trigger["address"] == "redis.example.internal:6380"
    assert trigger["databaseIndex"] == "2"
    assert trigger["enableTLS"] == "true" and trigger["unsafeSsl"] == "false"
    auth = _auth(r)
    assert auth == {"username": ("rl-instructrl-redis", "username"), "password": ("rl-instructrl-redis", "password"),
                    "ca": ("redis-ca", "ca.crt")}
    secret = _secret(r, "rl-instructrl-redis")
    assert secret == {"url": "rediss://rl-worker:s3cret@redis.example.internal:6380/2",
                      "username": "rl-worker", "password": "s3cret"}
    # the programs read the same URL
    env = ds.env_of(ds.server_container(r, "learner"))
    assert env["INSTRUCTRL_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rl-instructrl-redis", "key": "url"}


@pytest.mark.parametrize("url,address,db,tls,auth", [
    ("redis://r.example:6379/0", "r.example:6379", "0", "false", set()),
    ("redis://r.example", "r.example:6379", "0", "false", set()),
    ("rediss://:pw@r.example:7000/15", "r.example:7000", "15", "true", {"password"}),
    ("redis://bob@r.example/3", "r.example:6379", "3", "false", {"username"}),
])
def test_url_shapes(url, address, db, tls, auth):
    r = ds.render(_external(url))
    trigger = _trigger(r)
    assert (trigger["address"], trigger["databaseIndex"], trigger["enableTLS"]) == (address, db, tls)
    assert set(_auth(r)) == auth
    assert bool(r.of_kind("TriggerAuthentication")) == bool(auth)


def test_explicit_settings_win_over_the_url():
    r = ds.render(_external("rediss://u:p@r.example:6380/2", redisAddress="proxy.example:6390", databaseIndex=5,
                            passwordSecret={"name": "mine", "key": "pw"},
                            usernameSecret={"name": "mine", "key": "user"},
                            unsafeSsl=True))
    trigger = _trigger(r)
    assert (trigger["address"], trigger["databaseIndex"], trigger["unsafeSsl"]) == ("proxy.example:6390", "5", "true")
    assert _auth(r) == {"username": ("mine", "user"), "password": ("mine", "pw")}


def test_bundled_redis():
    r = ds.render(KEDA)
    trigger = _trigger(r)
    assert trigger["address"] == "rl-instructrl-redis.ml.svc:6379"
    assert (trigger["databaseIndex"], trigger["enableTLS"]) == ("0", "false")
    assert "unsafeSsl" not in trigger
    assert _auth(r) == {"password": ("rl-instructrl-redis", "password")}


def test_a_percent_encoded_password_is_refused_with_a_way_out():
    helm = ds.require_module("helm_python")
    with helm.Chart.load(str(ds.CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render(_external("rediss://u:p%40ss@r.example:6380/2"), name="rl", namespace="ml")
    assert "percent-encoded" in str(err.value) and "existingSecret" in str(err.value)
