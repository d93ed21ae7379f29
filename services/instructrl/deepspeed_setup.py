"""DeepSpeed set-up shared by every trainer (the learner and `instructrl sft | rm | dpo`):
the process group, the engine's JSON config, and the engine.

Runs on CPU with gloo (ZeRO 0-3, fp32) as well as on GPUs with NCCL; backend `auto` picks
NCCL when a GPU is visible and gloo otherwise. Under `torchrun` (or any launcher that sets
`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) the ranks meet through the environment;
a plain process is a world of one on a loopback port, and sets only `LOCAL_RANK` (which
DeepSpeed asserts) in `os.environ`. The optimizer is a plain torch optimizer handed to
`deepspeed.initialize` (DeepSpeed's FusedAdam needs CUDA, DeepSpeedCPUAdam a JIT-compiled
extension).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")

# One JIT-extension cache per Python environment. DeepSpeed compiles its CPU shared-memory
# comm op on first use under TORCH_EXTENSIONS_DIR, whose default (~/.cache/torch_extensions)
# every checkout and virtualenv of the machine shares: a build for another venv's headers
# invalidates it, and a build killed half-way leaves a lock file that stalls the next process.
# scripts/setup.sh prebuilds the op here, once. (The container images build it ahead of time
# into DeepSpeed itself, DS_BUILD_SHM_COMM=1, and their read-only venv is left alone.)
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl with a GPU, gloo without."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", torch_threads: int = 0, master_port: int = 0) -> tuple[int, int]:
    """Join (under a launcher) or create (alone) the process group; returns `(rank, world_size)`.

    `torch_threads` > 0 sets torch's intra-op threads; `master_port` is the loopback port of a
    world of one (0 = a free one). A second call in the same process reuses the group.
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:  # torchrun (or another launcher) set the env://
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{master_port or _free_port()}",
                                   rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's device (cuda:LOCAL_RANK with a GPU, cpu otherwise)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def ds_config(*, micro_batch_size: int, grad_accum_steps: int, grad_clip: float, zero_stage: int,
              bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config of one engine.

    DeepSpeed divides each micro-batch loss by `grad_accum_steps` and steps the optimizer
    (clipping the global gradient norm to `grad_clip`; 0 = off) at every `grad_accum_steps`-th
    `engine.step()`.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any],
                 lr_scheduler: Any = None):
    """`model` wrapped in a DeepSpeed engine that owns `optimizer` (and `lr_scheduler`)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    return engine
