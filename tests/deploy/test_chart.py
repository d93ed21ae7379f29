"""The Helm chart, rendered and linted by Helm's own Go SDK, validated against the Kubernetes
OpenAPI schemas of two versions (strict: unknown fields are errors) and, for the custom
resources, field by field.

Scenarios are the values files in helm/instructrl/ci/ plus the defaults.
"""
from __future__ import annotations

import base64
import json

import crd_fields
import deploy_support as ds
import netpol
import pytest
import yaml

SCENARIOS = ds.ci_values()


# --- lint and schema ----------------------------------------------------------------------

@pytest.mark.parametrize("kube", [ds.KUBE_VERSIONS[0], ds.KUBE_VERSIONS[-1]])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_is_clean(scenario, kube):
    helm = ds.require_module("helm_python")
    report = helm.lint(str(ds.CHART), SCENARIOS[scenario], strict=True, kube_version=f"v{kube}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], json.dumps(report, indent=1)


def test_kube_version_admits_exactly_the_versions_validated():
    """Chart.yaml's kubeVersion floor is 1.29 (issue 15): test_objects_validate checks every
    object on each admitted version kubernetes-validate ships (1.29 ... 1.37); Helm refuses an
    older cluster (test_chart_cluster_aware.py)."""
    assert ds.kube_floor() == "1.29.0"
    assert ds.KUBE_VERSIONS[0] == "1.29.0" and len(ds.KUBE_VERSIONS) >= 9, ds.KUBE_VERSIONS


BAD_VALUES = {
    "unknown top-level key": {"replicas": 3},
    "typo in a role": {"rollout": {"replicsa": 3}},
    "ranks as a string": {"learner": {"ranks": "4"}},
    "zero ranks": {"learner": {"ranks": 0}},
    "learner.gpus (it is gpusPerPod)": {"learner": {"gpus": 1}},
    "negative learner GPUs per pod": {"learner": {"gpusPerPod": -1}},
    "negative GPUs": {"reward": {"gpus": -1}},
    "GPU in resources": {"reference": {"resources": {"limits": {"nvidia.com/gpu": 2}}}},
    "bad quantity": {"rollout": {"resources": {"requests": {"memory": "lots"}}}},
    "KEDA and HPA together": {"rollout": {"autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}},
    "TLS without certificates": {"tls": {"enabled": True}},
    "mTLS without TLS": {"tls": {"mtls": True, "existingSecret": "certs"}},
    "TLS without the server name": {"tls": {"enabled": True, "existingSecret": "certs"}},
    "server name not a DNS name": {"tls": {"enabled": True, "existingSecret": "certs", "serverName": "a b"}},
    "external Redis without URL": {"redis": {"mode": "external"}},
    "unknown Redis mode": {"redis": {"mode": "cluster"}},
    "non-Redis URL": {"redis": {"mode": "external", "external": {"url": "http://x"}}},
    "KEDA on an external Redis in a Secret without address": {
        "redis": {"mode": "external", "external": {"existingSecret": "team-redis"}},
        "rollout": {"autoscaling": {"keda": {"enabled": True}}}},
    "negative KEDA database": {"rollout": {"autoscaling": {"keda": {"databaseIndex": -1}}}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "port out of range": {"ports": {"grpc": 70000}},
    "config override without =": {"reward": {"configOverrides": ["device"]}},
    "bad run id": {"buffer": {"runId": "has space"}},
    "PDB percent typo": {"rollout": {"pdb": {"enabled": True, "maxUnavailable": "25"}}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "config not a mapping": {"config": {"reward": "model=/m"}},
    "ranks without shared checkpoints": {"learner": {"ranks": 2}},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(case):
    helm = ds.require_module("helm_python")
    values = BAD_VALUES[case]
    with helm.Chart.load(str(ds.CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):  # install/template refuse them too
            chart.render(values, name="rl", namespace="ml")
    report = helm.lint(str(ds.CHART), values)
    assert report["errors"], f"lint accepted {values}"


def test_schema_closes_every_object():
    """values.schema.json: additionalProperties false on every object with named properties."""
    schema = json.loads((ds.CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where)
            for k, v in node.items():
                if k not in ("if", "then", "not", "anyOf", "allOf"):  # conditions, not shapes
                    walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(schema, "")
    assert not open_objects, open_objects


# --- every rendered object is valid -------------------------------------------------------

def test_kubernetes_validate_is_strict():
    """The validator really rejects an unknown field (so the next test means something)."""
    kv = ds.require_module("kubernetes_validate")
    deployment = ds.render().get("Deployment", "-reward")
    deployment["spec"]["replicaz"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, ds.KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_objects_validate(rendered, scenario):
    kv = ds.require_module("kubernetes_validate")
    errors = []
    for obj in rendered[scenario].objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith(crd_fields.CRD_API_GROUPS):
            errors += crd_fields.check_custom_resource(obj)
            continue
        for version in ds.KUBE_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                errors.append(f"{where} (k8s {version}): {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_recommended_labels(rendered, scenario):
    r = rendered[scenario]
    names = {}
    for obj in r.objects:
        labels = obj["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {key}"
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in names, f"duplicate {key}"
        names[key] = obj
    for kind in ("Deployment", "StatefulSet"):
        for w in r.of_kind(kind):
            component = w["metadata"]["labels"]["app.kubernetes.io/component"]
            selector = w["spec"]["selector"]["matchLabels"]
            pod_labels = w["spec"]["template"]["metadata"]["labels"]
            assert selector["app.kubernetes.io/component"] == component
            assert selector.items() <= pod_labels.items()


def test_crd_checker_catches_mistakes():
    r = ds.render(SCENARIOS["keda"])
    scaled = r.get("ScaledObject", "-rollout")
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 64          # KEDA wants strings
    scaled["spec"]["triggers"][0]["metadata"]["lagcount"] = "64"        # and known keys
    scaled["spec"]["maxReplicas"] = 3                                   # HPA's name, not KEDA's
    errors = crd_fields.check_custom_resource(scaled)
    assert any("lagCount: expected str" in e for e in errors), errors
    assert any("lagcount: unknown redis-streams key" in e for e in errors), errors
    assert any("maxReplicas: unknown field" in e for e in errors), errors


# --- what each role gets ------------------------------------------------------------------

SERVERS = {"Deployment": ("rollout", "reward", "reference"), "StatefulSet": ("learner",)}


def test_defaults(rendered):
    r = rendered["default"]
    for role in ("rollout", "reward", "reference", "learner"):
        c = ds.server_container(r, role)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, role
        assert c["image"].endswith("-gpu"), c["image"]
        assert c["args"][:4] == ["serve", role, "--config", "/etc/instructrl/config.yaml"]
        assert {"server.host=0.0.0.0", "server.port=50051", "server.metrics_port=9090"} <= set(c["args"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"]["port"] == 50051, (role, probe)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
        assert mount["subPath"] == f"{role}.yaml"
    assert ds.server_container(r, "reward")["readinessProbe"]["grpc"]["service"] == "instructrl.v1.RewardService"
    assert {"device=cuda", "torch_threads=4"} <= set(ds.server_container(r, "reward")["args"])
    worker = ds.containers(r.get("Deployment", "-rollout"))["worker"]
    assert worker["args"][:3] == ["rollout-worker", "--config", "/etc/instructrl/config.yaml"]
    assert "nvidia.com/gpu" not in worker.get("resources", {}).get("limits", {})
    assert ds.env_of(worker)["INSTRUCTRL_ROLLOUT_ADDRESS"]["value"] == "127.0.0.1:50051"
    # the worker registers the pod's address with the learner, not its own loopback one
    assert ds.env_of(worker)["INSTRUCTRL_ADVERTISE_ADDRESS"]["value"] == "$(POD_IP):50051"
    assert "rollout_advertise=$(INSTRUCTRL_ADVERTISE_ADDRESS)" in worker["args"]
    names = [e["name"] for e in worker["env"]]  # $(POD_IP) expands only if defined before
    assert names.index("POD_IP") < names.index("INSTRUCTRL_ADVERTISE_ADDRESS")
    assert ds.env_of(worker)["INSTRUCTRL_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"
    # bundled Redis: AOF on a PVC, URL and password in one Secret
    redis = r.get("StatefulSet", "-redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "appendonly yes" in r.get("ConfigMap", "-redis")["data"]["redis.conf"]
    secret = r.get("Secret", "-redis")["data"]
    url = base64.b64decode(secret["url"]).decode()
    assert url == "redis://rl-instructrl-redis.ml.svc:6379/0"
    assert len(base64.b64decode(secret["password"])) == 32
    # run config: one file per program
    data = r.get("ConfigMap", "-config")["data"]
    assert set(data) == {"rollout.yaml", "rollout-worker.yaml", "reward.yaml", "reference.yaml", "learner.yaml"}
    # dashboard ConfigMap for the Grafana sidecar, identical to deploy/grafana
    dash = r.get("ConfigMap", "-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["instructrl.json"]) == ds.dashboard()
    assert not r.of_kind("ServiceMonitor") and not r.of_kind("ScaledObject")
    assert r.get("Deployment", "-rollout")["spec"]["replicas"] == 2
    assert {p["metadata"]["name"] for p in r.of_kind("PodDisruptionBudget")} == {
        f"rl-instructrl-{x}" for x in ("rollout", "reward", "reference", "learner")}
    assert "instructrl.v1.LearnerService/GetStatus" in r.notes


@pytest.mark.parametrize("scenario,ranks", [("default", 1), ("tls", 4), ("hpa", 4)])
def test_learner_ranks(rendered, scenario, ranks):
    r = rendered[scenario]
    sts = r.get("StatefulSet", "-learner")
    assert sts["spec"]["replicas"] == ranks
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = r.get("Service", "-learner-headless")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert {p["port"] for p in headless["spec"]["ports"]} >= {29500, 29600}
    env = ds.env_of(ds.containers(sts)["learner"])
    assert env["WORLD_SIZE"]["value"] == str(ranks) and env["LOCAL_WORLD_SIZE"]["value"] == "1"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert "RANK" not in env and "LOCAL_RANK" not in env  # the pod's launcher sets them per local rank
    assert env["MASTER_ADDR"]["value"] == "rl-instructrl-learner-0.rl-instructrl-learner-headless.ml.svc"
    assert env["MASTER_PORT"]["value"] == "29500"
    client = r.get("Service", "-learner")
    assert client["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "rl-instructrl-learner-0"
    # only rank 0 serves grpc.health: probes for a single rank only
    probes = {"startupProbe", "livenessProbe", "readinessProbe"} & set(ds.containers(sts)["learner"])
    assert probes == ({"startupProbe", "livenessProbe", "readinessProbe"} if ranks == 1 else set())
    if ranks > 1:
        assert not [v for v in sts["spec"].get("volumeClaimTemplates", [])], "ranks share one checkpoint claim"


def test_external_redis(rendered):
    r = rendered["external-redis"]
    assert not [o for o in r.objects if o["metadata"]["name"].endswith(("-redis", "-redis-headless"))
                and o["kind"] != "Secret"]
    url = base64.b64decode(r.get("Secret", "-redis")["data"]["url"]).decode()
    assert url == SCENARIOS["external-redis"]["redis"]["external"]["url"]
    r = rendered["external-redis-secret"]
    assert not r.of_kind("Secret")
    ref = ds.env_of(ds.server_container(r, "learner"))["INSTRUCTRL_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "team-redis", "key": "redis-url"}
    scaled = r.get("ScaledObject", "-rollout")["spec"]["triggers"][0]["metadata"]
    assert scaled["address"] == "redis.example.internal:6380" and scaled["enableTLS"] == "true"
    assert r.get("TriggerAuthentication", "-rollout")["spec"]["secretTargetRef"][0]["name"] == "team-redis"


@pytest.mark.parametrize("scenario", ["tls", "tls-inline"])
def test_tls_and_token(rendered, scenario):
    r = rendered[scenario]
    mtls = SCENARIOS[scenario]["tls"].get("mtls", False)
    for role in ("rollout", "reward", "reference", "learner"):
        c = ds.server_container(r, role)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in c or role != "learner":  # a multi-rank learner has none (rank > 0 serves no gRPC)
                assert c[probe]["grpc"]["port"] == 50050, "probes must use the plaintext health port"
        assert {"server.health_port=50050", "server.tls.cert_file=/etc/instructrl/tls/tls.crt",
                f"server.tls.require_client_auth={str(mtls).lower()}"} <= set(c["args"])
        assert ds.env_of(c)["INSTRUCTRL_TLS_DIR"]["value"] == "/etc/instructrl/tls"
        assert ds.env_of(c)["INSTRUCTRL_TLS_SERVER_NAME"]["value"] == "instructrl.internal"
        assert "secretKeyRef" in ds.env_of(c)["INSTRUCTRL_TOKEN"]["valueFrom"]
    # the worker's clients (reward, reference, learner, its rollout service) take TLS from the mount
    worker = ds.containers(r.get("Deployment", "-rollout"))["worker"]
    assert ds.env_of(worker)["INSTRUCTRL_TLS_DIR"]["value"] == "/etc/instructrl/tls"
    assert ds.env_of(worker)["INSTRUCTRL_MTLS"]["value"] == str(mtls).lower()
    assert any(m["name"] == "tls" and m["mountPath"] == "/etc/instructrl/tls" for m in worker["volumeMounts"])
    pod = r.get("Deployment", "-reward")["spec"]["template"]["spec"]
    tls_volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    if scenario == "tls":
        assert tls_volume["secret"]["secretName"] == "instructrl-certs"
        assert r.get("Secret", "-token")["data"]["token"]
    else:
        secret = r.get("Secret", "-tls")
        assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
        assert not [s for s in r.of_kind("Secret") if s["metadata"]["name"].endswith("-token")]


def test_keda(rendered):
    r = rendered["keda"]
    assert "replicas" not in r.get("Deployment", "-rollout")["spec"]
    assert not r.of_kind("HorizontalPodAutoscaler")
    spec = r.get("ScaledObject", "-rollout")["spec"]
    assert spec["scaleTargetRef"]["name"] == "rl-instructrl-rollout"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 16)
    trigger = spec["triggers"][0]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"]["stream"] == "instructrl:{default}:prompts"
    assert trigger["metadata"]["consumerGroup"] == "rollout"
    assert trigger["metadata"]["address"] == "rl-instructrl-redis.ml.svc:6379"
    auth = r.get("TriggerAuthentication", "-rollout")["spec"]["secretTargetRef"][0]
    assert (auth["parameter"], auth["name"], auth["key"]) == ("password", "rl-instructrl-redis", "password")
    keda_ns = netpol.Pod({"app": "keda-operator"}, namespace="keda")
    redis = _pod(r, "redis")
    assert netpol.allowed(r.of_kind("NetworkPolicy"), keda_ns, redis, 6379)
    # the operator objects of the same scenario
    sm = r.get("ServiceMonitor", "rl-instructrl")
    assert all(e["honorLabels"] for e in sm["spec"]["endpoints"])
    scraped = [s for s in r.of_kind("Service") if s["metadata"]["labels"].get("instructrl.io/scrape") == "true"]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped} == {
        "rollout", "reward", "reference", "learner"}
    port_names = {p["name"] for s in scraped for p in s["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names
    rule = r.get("PrometheusRule", "rl-instructrl")
    assert rule["spec"] == yaml.safe_load(ds.ALERTS.read_text())


def test_hpa(rendered):
    r = rendered["hpa"]
    hpa = r.get("HorizontalPodAutoscaler", "-rollout")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert not r.of_kind("ScaledObject") and "replicas" not in r.get("Deployment", "-rollout")["spec"]


def test_cpu_only(rendered):
    r = rendered["cpu"]
    text = json.dumps(r.objects)
    assert "nvidia.com/gpu" not in text and "-gpu\"" not in text
    assert "device=cpu" in ds.server_container(r, "reference")["args"]
    assert not r.of_kind("NetworkPolicy") and not r.of_kind("ServiceAccount")
    assert list(ds.containers(r.get("Deployment", "-rollout"))) == ["rollout"]


# --- NetworkPolicies: only the roles that must talk can -----------------------------------

def _pod(r: ds.Rendered, component: str) -> netpol.Pod:
    for w in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            ports = {p["name"]: p["containerPort"] for c in ds.containers(w).values() for p in c.get("ports", [])}
            return netpol.Pod(w["spec"]["template"]["metadata"]["labels"], ports=ports)
    raise AssertionError(f"no workload for {component}")


# (source, destination, port, allowed)
TALK = [
    ("rollout", "reward", 50051, True), ("rollout", "reference", 50051, True),
    ("rollout", "learner", 50051, True), ("rollout", "learner", 29600, True),
    ("rollout", "learner", 41234, True),   # NCCL/gloo ephemeral port
    ("learner", "rollout", 50051, True), ("learner", "rollout", 41234, True),
    ("rollout", "rollout", 41234, True),   # ring/tree of the broadcast group
    ("learner", "learner", 29500, True), ("learner", "learner", 41234, True),
    ("rollout", "redis", 6379, True), ("learner", "redis", 6379, True),
    ("reward", "learner", 50051, False), ("reward", "rollout", 50051, False),
    ("reference", "reward", 50051, False), ("learner", "reward", 50051, False),
    ("learner", "reference", 50051, False), ("reward", "redis", 6379, False),
    ("reference", "redis", 6379, False), ("rollout", "reward", 29600, False),
    ("redis", "learner", 50051, False),
]


@pytest.mark.parametrize("scenario", ["default", "hpa", "keda"])
def test_network_policies(rendered, scenario):
    r = rendered[scenario]
    policies = r.of_kind("NetworkPolicy")
    wrong = []
    for src, dst, port, expect in TALK:
        if netpol.allowed(policies, _pod(r, src), _pod(r, dst), port) != expect:
            wrong.append(f"{src} -> {dst}:{port} should be {'allowed' if expect else 'denied'}")
    prometheus = netpol.Pod({"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")
    for role in ("rollout", "reward", "reference", "learner"):
        if not netpol.allowed(policies, prometheus, _pod(r, role), 9090):
            wrong.append(f"prometheus cannot scrape {role}")
        if netpol.allowed(policies, prometheus, _pod(r, role), 50051):
            wrong.append(f"prometheus reaches the gRPC port of {role}")
    assert netpol.allowed(policies, prometheus, _pod(r, "rollout"), 9091), "worker metrics"
    assert not wrong, "\n".join(wrong)

