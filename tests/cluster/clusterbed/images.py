"""Container images as commands of this machine: what `docker run IMAGE ARGS` would exec.

An image gives the entrypoint, the default command (CMD), its ENV and its WORKDIR; the pod's
`command` replaces the entrypoint and its `args` replace CMD, as in Kubernetes. The rest of the
image's filesystem is this machine's (the container's root is an overlay of /).

- `instructrl/instructrl:*` (deploy/docker/Dockerfile.cpu): ENTRYPOINT ["instructrl"], the
  repository's `.venv/bin` first on PATH instead of /opt/venv/bin, and this checkout's
  `services/` on PYTHONPATH (the venv's editable install may name another worktree).
- `redis:*` (the official image): docker-entrypoint.sh puts `redis-server` before args that
  start with `-` or end in `.conf`; here it is this machine's `redis-server`.
- `python:*` (for the bed's own tests): the repository's venv Python.

The image's HOME is empty (a fresh writable layer), so nothing this machine cached is there.
One thing stands in for a prebuilt op of the image: DeepSpeed's CPU shm comm op, which every
learner start would otherwise compile (1-2 minutes here, 5 under load). `prebuild_ops` builds
it once into this checkout's own `build/torch_extensions` (not ~/.cache/torch_extensions nor a
directory in the venv: git worktrees share one venv, and each rebuilds the op for its own
paths, so a pod would find the build of another checkout and compile it again), and the image
finds it through TORCH_EXTENSIONS_DIR.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# resolved: a git worktree's .venv may be a link to a shared venv, whose scripts' shebangs name
# its real path; DeepSpeed's JIT build names the headers by the interpreter's path, so the
# prebuild below must run the pods' interpreter or every pod finds the op stale and compiles it
VENV_BIN = (ROOT / ".venv").resolve() / "bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OPS_DIR = ROOT / "build" / "torch_extensions"
SHM_OP = OPS_DIR / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"


def prebuild_ops(timeout_s: float = 900) -> None:
    """Build (or find up to date: ~3 s) DeepSpeed's CPU shm comm op in OPS_DIR, with the PATH the
    pods have: ninja re-runs a build whose command came from another `ninja` on PATH."""
    env = {"PATH": f"{VENV_BIN}:{SYSTEM_PATH}", "HOME": str(OPS_DIR), "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(OPS_DIR)}
    OPS_DIR.mkdir(parents=True, exist_ok=True)
    build = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    r = subprocess.run([str(VENV_BIN / "python"), "-c", build],
                       env=env, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode != 0 or not SHM_OP.exists():
        raise RuntimeError(f"DeepSpeed's shm comm op did not build (rc {r.returncode}):\n{r.stderr[-2000:]}")


@dataclasses.dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str = "/"
    redis_entrypoint: bool = False  # docker-entrypoint.sh of the redis image

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        if command:
            return list(command) + list(args or [])
        argv = list(self.entrypoint) + list(self.cmd if args is None else args)
        if self.redis_entrypoint and argv and (argv[0].startswith("-") or argv[0].endswith(".conf")):
            argv = ["redis-server"] + argv
        return argv


def default_images() -> dict[str, Image]:
    """Image repository -> Image. Raises with what to install when a program is missing."""
    instructrl = VENV_BIN / "instructrl"
    if not instructrl.exists():
        raise FileNotFoundError(f"{instructrl} is missing: run `bash scripts/setup.sh`")
    if shutil.which("redis-server") is None:
        raise FileNotFoundError("redis-server is not on PATH: apt-get install redis-server")
    venv_path = f"{VENV_BIN}:{SYSTEM_PATH}"
    # this checkout's code (services/, module path == import path), not whatever checkout the venv's
    # editable install names: git worktrees share one venv, as the image ships one tree
    code = {"PYTHONPATH": str(ROOT / "services")}
    prebuilt = {"TORCH_EXTENSIONS_DIR": str(OPS_DIR)} if SHM_OP.exists() else {}
    return {
        "instructrl/instructrl": Image(
            ["instructrl"], ["--help"], {
                "PATH": venv_path, "PYTHONUNBUFFERED": "1", "HOME": "/home/instructrl",
                "HF_HOME": "/home/instructrl/.cache/huggingface", "VLLM_TARGET_DEVICE": "cpu", **code, **prebuilt},
            workdir="/home/instructrl"),
        "redis": Image([], ["redis-server"], {"PATH": SYSTEM_PATH}, workdir="/data", redis_entrypoint=True),
        "python": Image([], ["python3"], {"PATH": venv_path, "PYTHONUNBUFFERED": "1", **code}),
    }


def lookup(images: dict[str, Image], reference: str) -> Image:
    """The Image of `repository[:tag]` (the tag is ignored: there is one build, this checkout)."""
    repository = reference.rsplit(":", 1)[0] if ":" in reference.rsplit("/", 1)[-1] else reference
    if repository not in images:
        raise KeyError(f"image {reference!r}: the bed maps no command to {repository!r} (known: {sorted(images)})")
    return images[repository]
