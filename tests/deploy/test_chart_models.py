"""Model provisioning (issue 15 item 5): with `models.source: hf` each pod's init container
downloads the Hub repos its role needs, at pinned commits, into the models volume, once, and
the role reads `<mountPath>/<name>` read-only.

No network here: the init container's rendered command and environment are run for real
(`instructrl fetch-models`, huggingface_hub's snapshot_download) with HF_HUB_OFFLINE=1 against
a Hub cache built locally in the layout huggingface_hub keeps (models--org--name/{blobs,
snapshots/<commit>,refs}), holding a tiny model built from a config; transformers then loads
the model from where the role reads it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import deploy_support as ds
import pytest

SFT_COMMIT = hashlib.sha1(b"tiny-sft").hexdigest()
RM_COMMIT = hashlib.sha1(b"tiny-rm").hexdigest()
REPOS = [
    {"repo": "acme/tiny-sft", "revision": SFT_COMMIT, "name": "sft", "roles": ["rollout", "reference", "learner"]},
    {"repo": "acme/tiny-rm", "revision": RM_COMMIT, "name": "reward", "roles": ["reward", "learner"]},
]


def _hf_values(mount: str = "/models", **hf) -> dict:
    return {"models": {"source": "hf", "mountPath": mount,
                       "hf": {"repos": REPOS, "tokenSecret": {"name": "hf-token", "key": "token"}, **hf}}}


def put_in_hub_cache(hub: Path, repo: str, commit: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as huggingface_hub's cache does after downloading `repo` at `commit`:
    file contents in blobs/<sha256>, snapshots/<commit>/<path> relative symlinks to them,
    refs/main naming the commit."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, TinyModelConfig(vocab_size=300, hidden_size=64, num_heads=1, num_layers=1))
    return out


def _init_container(r: ds.Rendered, role: str) -> dict:
    kind = "StatefulSet" if role == "learner" else "Deployment"
    spec = r.get(kind, f"-{role}")["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) if c["name"] == "fetch-models")


def _run(container: dict, **extra_env) -> subprocess.CompletedProcess:
    """The init container as the kubelet runs it: the image's entrypoint (`instructrl`, the
    venv's here) with the container's args and env (the token Secret filled in)."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update({e["name"]: "hf_not_a_real_token" for e in container["env"] if "valueFrom" in e})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env, **extra_env}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(["instructrl", *container["args"]], env=env, capture_output=True, text=True, timeout=300)


def test_init_container_fetches_from_the_hub_cache_once(tmp_path, tiny_model):
    mount = tmp_path / "models"            # the models volume, as the pod mounts it
    hub = mount / ".huggingface" / "hub"   # where the init container's HF_HOME puts the Hub cache
    put_in_hub_cache(hub, "acme/tiny-sft", SFT_COMMIT, tiny_model)
    put_in_hub_cache(hub, "acme/tiny-rm", RM_COMMIT, tiny_model)
    r = ds.render(_hf_values(str(mount)))

    learner = _init_container(r, "learner")
    out = _run(learner, HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stdout + out.stderr
    for name, commit in (("sft", SFT_COMMIT), ("reward", RM_COMMIT)):
        link = mount / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), "relative: any pod resolves it"
        assert link.resolve().name == commit and (link / "config.json").is_file()
        assert (mount / ".instructrl-fetch" / f"{name}.json").is_file()

    # the role loads what it reads at <mountPath>/<name>
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(mount / "sft")
    assert model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(mount / "reward").vocab_size > 0

    # a second start of the pod (or another pod on a shared volume) does nothing: with the Hub
    # cache out of reach it still succeeds, from the marker alone
    again = _run(learner, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "nowhere"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stderr and not (tmp_path / "nowhere").exists()

    # a role needing a repo that is not there: one line naming it, non-zero exit (pod not started)
    r2 = ds.render({"models": {**_hf_values(str(tmp_path / "other"))["models"],
                               "hf": {"repos": [{**REPOS[0], "revision": "f" * 40}]}}})
    missing = _run(_init_container(r2, "rollout"), HF_HUB_OFFLINE="1")
    assert missing.returncode == 1
    assert "repos[0] (acme/tiny-sft@ffffffffffff)" in missing.stderr and "Traceback" not in missing.stderr


def test_unpinned_revision_is_refused_by_the_command_and_the_schema():
    out = subprocess.run([sys.executable, "-m", "instructrl.cli", "fetch-models", "dest=/tmp/unused",
                          "repos=[{repo: acme/x, revision: main, name: sft}]"], capture_output=True, text=True)
    assert out.returncode == 2 and "repos[0].revision: 'main' is not a commit hash" in out.stderr
    helm = ds.require_module("helm_python")
    bad = [
        {"models": {"source": "hf", "hf": {"repos": [{**REPOS[0], "revision": "main"}]}}},
        {"models": {"source": "hf"}},                                                # nothing to fetch
        {"models": {"source": "hf", "existingClaim": "models", "hf": {"repos": REPOS}}},  # pvc's key
        {"models": {"source": "s3"}},
        {"models": {"source": "hf", "hf": {"repos": [{**REPOS[0], "roles": ["worker"]}]}}},
    ]
    with helm.Chart.load(str(ds.CHART)) as chart:
        for values in bad:
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(values)


@pytest.mark.parametrize("cache", ["emptyDir", "claim"])
def test_rendered_pods_fetch_what_their_role_reads(cache):
    hf = {"cache": {"existingClaim": "hub-cache", "sizeLimit": "1Ti"}} if cache == "claim" else {}
    r = ds.render(_hf_values(**hf))
    wanted = {"rollout": ["sft"], "reference": ["sft"], "reward": ["reward"], "learner": ["sft", "reward"]}
    for role, names in wanted.items():
        kind = "StatefulSet" if role == "learner" else "Deployment"
        spec = r.get(kind, f"-{role}")["spec"]["template"]["spec"]
        init = _init_container(r, role)
        assert init["args"][:2] == ["fetch-models", "dest=/models"]
        repos = init["args"][2]
        assert [n for n in ("sft", "reward") if f'"name":"{n}"' in repos] == names, (role, repos)
        env = ds.env_of(init)
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert env["HF_HOME"]["value"] == "/models/.huggingface"
        assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
        assert {m["name"]: m.get("readOnly", False) for m in init["volumeMounts"]}["models"] is False
        for c in spec["containers"]:
            mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
            assert mount["mountPath"] == "/models" and mount["readOnly"], (role, c["name"])
        volume = next(v for v in spec["volumes"] if v["name"] == "models")
        if cache == "claim":
            assert volume == {"name": "models", "persistentVolumeClaim": {"claimName": "hub-cache"}}
        else:
            assert volume == {"name": "models", "emptyDir": {"sizeLimit": "200Gi"}}


def test_pvc_source_has_no_init_container(rendered):
    for role in ("rollout", "reward", "reference", "learner"):
        kind = "StatefulSet" if role == "learner" else "Deployment"
        spec = rendered["tls"].get(kind, f"-{role}")["spec"]["template"]["spec"]
        assert "initContainers" not in spec
        assert next(v for v in spec["volumes"] if v["name"] == "models")["persistentVolumeClaim"] == {
            "claimName": "instructrl-models", "readOnly": True}
