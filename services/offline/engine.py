"""What the three offline trainers share: config sections, DeepSpeed set-up, the LR
schedule, the metrics log, atomic saving, and the command-line shell.

DeepSpeed on CPU: gloo process group (a single process sets MASTER_ADDR/PORT, RANK
and WORLD_SIZE itself, on a free port), fp32, and torch's AdamW handed to
``deepspeed.initialize`` (DeepSpeed's FusedAdam needs CUDA). On a GPU host under
the ``deepspeed`` launcher the same code runs with the launcher's environment and
``deepspeed.backend=nccl``.

Atomic output: a stage writes everything (model, tokenizer, metrics log) into
``<output_dir>.tmp-<pid>`` and renames it to ``<output_dir>`` only when training
and saving succeeded; on failure the staging directory is removed and an
existing ``<output_dir>`` is left as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import socket
import sys
import time
from typing import Any, Callable, Iterator

import torch

from instructrl.config import ConfigError, field, help_lines, load


@dataclasses.dataclass
class TrainConfig:
    epochs: int = field(1, help="passes over the training data (ignored when max_steps > 0)")
    max_steps: int = field(0, help="optimizer steps to run; 0 = as many as `epochs` take")
    micro_batch_size: int = field(16, help="examples per forward pass per rank (RM: prompts, DPO: pairs)")
    grad_accum_steps: int = field(1, help="micro-batches per optimizer step")
    eval_every: int = field(0, help="evaluate every this many optimizer steps (0 = only at the end)")
    log_every: int = field(10, help="write a train line to the metrics log every this many steps")
    seed: int = field(0, help="seed for initialisation, shuffling and the held-out split")
    progress: bool = field(True, help="show a tqdm progress bar (rank 0)")

    def validate(self) -> None:
        for name in ("micro_batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise ConfigError("train.epochs: must be >= 1 (or set train.max_steps)")


@dataclasses.dataclass
class OptimConfig:
    lr: float = field(1e-4, help="peak learning rate of AdamW")
    weight_decay: float = field(0.0, help="AdamW weight decay (not applied to norms and biases)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    eps: float = field(1e-8, help="AdamW epsilon")
    warmup_steps: int = field(0, help="linear warm-up steps from 0 to lr")
    schedule: str = field("cosine", help="after warm-up: constant, linear or cosine decay")
    min_lr_ratio: float = field(0.1, help="final learning rate as a fraction of lr (linear/cosine)")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0 = off)")

    def validate(self) -> None:
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"optim.schedule: expected constant, linear or cosine, got {self.schedule!r}")
        if self.lr <= 0:
            raise ConfigError("optim.lr: must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio: must lie in [0, 1]")


@dataclasses.dataclass
class DeepSpeedConfig:
    zero_stage: int = field(0, help="ZeRO stage: 0 (plain data parallel), 2 (shard optimizer state and "
                                    "gradients) or 3 (shard parameters too)")
    backend: str = field("gloo", help="torch.distributed backend: gloo (CPU) or nccl (GPU)")
    master_port: int = field(0, help="rendezvous port for a single-process run (0 = pick a free one); "
                                     "ignored under a launcher that sets MASTER_PORT")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")


def require(value: str, name: str) -> None:
    if not value:
        raise ConfigError(f"{name}: required")


def validate_stage(cfg) -> None:
    """The checks every offline stage config shares: model, output_dir, data.train_file are
    set, and the train/optim/deepspeed sections are valid."""
    require(cfg.model, "model")
    require(cfg.output_dir, "output_dir")
    require(cfg.data.train_file, "data.train_file")
    cfg.train.validate()
    cfg.optim.validate()
    cfg.deepspeed.validate()


# ---------------------------------------------------------------- DeepSpeed

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(ds: DeepSpeedConfig) -> tuple[int, int]:
    """Join (or, alone, create) the process group; returns ``(rank, world_size)``."""
    import logging

    import deepspeed
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain single process, not under a launcher
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ["MASTER_PORT"] = str(ds.master_port or _free_port())
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend=ds.backend)
    return dist.get_rank(), dist.get_world_size()


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` of ``total``."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, ds: DeepSpeedConfig,
                 total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine with AdamW and the warm-up/decay schedule."""
    import deepspeed

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, optim))
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def total_optimizer_steps(batches_per_epoch: int, train: TrainConfig) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return max(1, train.epochs * math.ceil(batches_per_epoch / train.grad_accum_steps))


def micro_batches(num_items: int, train: TrainConfig, rank: int, world: int) -> Iterator[tuple[int, list[int]]]:
    """``(epoch, indices)`` for every micro-batch, epoch after epoch, until the caller stops."""
    from instructrl.offline.data import batch_indices

    epoch = 0
    while True:
        batches = batch_indices(num_items, train.micro_batch_size, epoch, train.seed, rank, world)
        if not batches:
            raise ValueError(f"{num_items} training examples cannot feed {world} ranks")
        for b in batches:
            yield epoch, b
        epoch += 1


# ---------------------------------------------------------------- output

class MetricsLog:
    """Append-only JSONL metrics (one object a line, flushed at once); rank 0 only."""

    def __init__(self, path: pathlib.Path | None):
        self.path = path
        self.start = time.monotonic()
        self._f = open(path, "a") if path is not None else None

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "elapsed_s": round(time.monotonic() - self.start, 3)}
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        return record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike, rank: int = 0) -> Iterator[pathlib.Path | None]:
    """Yield a staging dir (rank 0; None elsewhere) that becomes ``output_dir`` only on success."""
    out = pathlib.Path(output_dir)
    if rank != 0:
        yield None
        return
    stage = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def full_state_dict(module: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full (ZeRO-3 parameters are gathered first); collective under ZeRO-3."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def save_hf(module, tokenizer, stage: pathlib.Path | None, zero_stage: int, info: dict[str, Any]) -> None:
    """Save a HF model (safetensors), its tokenizer and ``instructrl.json`` into the staging dir."""
    state = full_state_dict(module, zero_stage)
    if stage is None:
        return
    module.save_pretrained(stage, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    (stage / "instructrl.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def mean_of(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------- command line

def run_main(argv: list[str], prog: str, description: str, config_cls: type,
             train_fn: Callable[[Any], dict[str, Any]]) -> int:
    """``instructrl <stage> --config FILE [key=value ...]``: load, train, print the final metrics.

    Exit codes: 0 success, 2 bad config or data (message on stderr naming the field or
    FILE:LINE), 1 any other failure (with a traceback).
    """
    from instructrl.offline.data import DataError

    ap = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (YAML keys, or key=value overrides):\n  " + "\n  ".join(help_lines(config_cls)))
    ap.add_argument("--config", help="YAML file with the fields below")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.epochs=2")
    args = ap.parse_args(argv)
    try:
        cfg = load(config_cls, args.config, args.overrides)
        metrics = train_fn(cfg)
    except (ConfigError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0

