"""`readOnlyRootFilesystem: true` holds for every role (issue 15 item 6): a whole local run
(`instructrl launch`: Redis, reward, reference, vLLM rollout, rollout worker, DeepSpeed learner,
all real processes) trains on a root filesystem where nothing is writable except what the
chart gives its pods: /tmp (emptyDir `tmp`), the home directory (emptyDir `home`, where the
caches go), /dev/shm (emptyDir `dshm`) and the volumes (here the run's work directory stands in
for the checkpoint and Redis PVCs).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import deploy_support as ds
import pytest
import readonly_root
import yaml

pytestmark = pytest.mark.slow


def _writable_mounts(r: ds.Rendered) -> dict[str, set[str]]:
    """Per chart container: the paths its pod lets it write (emptyDirs and PVCs, not read-only)."""
    out = {}
    for w in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
        spec = w["spec"]["template"]["spec"]
        writable_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v}
        writable_volumes |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            out[f"{w['metadata']['name']}/{c['name']}"] = {
                m["mountPath"] for m in c.get("volumeMounts", [])
                if m["name"] in writable_volumes and not m.get("readOnly")}
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
    return out


def test_every_role_runs_on_a_read_only_root():
    why = readonly_root.available()
    if why:
        pytest.skip(why)
    r = ds.render({"models": {"source": "hf", "hf": {"repos": [
        {"repo": "acme/x", "revision": "0" * 40, "name": "sft"}]}}})
    home = ds.env_of(ds.server_container(r, "learner"))["HOME"]["value"]
    for where, paths in _writable_mounts(r).items():
        if where.endswith(("/redis",)):
            continue
        assert {"/tmp", home} <= paths, (where, paths)

    base = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="instructrl-rofs-"))
    try:
        tmp, home_root, work, inputs = (base / d for d in ("tmp", "home", "work", "inputs"))
        for d in (tmp, work, inputs, home_root / Path(home).name):
            d.mkdir(parents=True)
        cfg = _launch_config(inputs, work)
        argv = readonly_root.command(
            [str(Path(sys.executable).parent / "instructrl"), "launch", "--config", str(cfg)],
            {str(tmp): "/tmp", str(home_root): str(Path(home).parent), str(work): str(work)})
        env = dict(os.environ, HOME=home, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        env.pop("TMPDIR", None)
        # A pod starts with neither; this process may carry them from the tests before (the
        # venv-local DeepSpeed JIT cache), and on a read-only root that cache cannot take its lock.
        env.pop("TORCH_EXTENSIONS_DIR", None)
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((work / "logs").glob("*.log")))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + logs
        assert "iteration 3/3: score" in out.stdout and "run finished" in out.stdout, out.stdout
        written = sorted(str(p.relative_to(home_root)) for p in home_root.rglob("*") if p.is_dir())[:20]
        print("written under HOME:", written)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _launch_config(inputs: Path, work: Path) -> Path:
    from instructrl.demo.task import answer, make_prompts, tokenizer_corpus
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    model = inputs / "policy"
    build_tiny_llama(model, TinyModelConfig(hidden_size=64, num_heads=1, num_layers=1), tokenizer_corpus())
    prompts = inputs / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p, "metadata": {"answer": answer(p)}}) + "\n"
                               for i, p in enumerate(make_prompts(48, seed=0))))
    cfg = {
        "run_id": "rofs", "workdir": str(work), "prompts": str(prompts), "epochs": 20,
        "reward": {"rule": "instructrl.reward.rules:exact_match", "tokenizer": str(model)},
        "reference": {"model": str(model)},
        "rollout": {"engine": {"model": str(model), "dtype": "float32", "max_model_len": 128,
                               "enforce_eager": True, "kv_cache_gb": 1}},
        "worker": {"sampling": {"n": 2, "max_tokens": 8}, "claim_batch": 8},
        "learner": {"model": {"actor_path": str(model)},
                    "ppo": {"batch_size": 16, "minibatch_size": 16, "micro_batch_size": 8, "epochs": 1,
                            "max_iterations": 3},
                    "buffer": {"capacity": 64}, "pacing": {"max_policy_lag": 1},
                    "checkpoint": {"every": 2}},
    }
    path = inputs / "launch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
