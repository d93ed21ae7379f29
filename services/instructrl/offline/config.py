"""What the configs of the three offline stages share (`train`, `optim`, `deepspeed`), and
their command line: `instructrl <stage> --config FILE [key=value ...]`.

In the offline stages a *step* is an optimizer step (`grad_accum_steps` micro-batches).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from instructrl.config import ConfigError, field, help_lines, load
from instructrl.deepspeed_setup import BACKENDS


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
    backend: str = field("auto", help="torch.distributed backend: auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    master_port: int = field(0, help="rendezvous port for a single-process run (0 = pick a free one); "
                                     "ignored under a launcher that sets MASTER_PORT")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"deepspeed.backend: expected auto, gloo or nccl, got {self.backend!r}")


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


def run_main(argv: list[str], prog: str, description: str, config_cls: type,
             train_fn: Callable[[Any], dict[str, Any]]) -> int:
    """`instructrl <stage> --config FILE [key=value ...]`: load, train, print the final metrics.

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
        cfg: Any = load(config_cls, args.config, args.overrides)
        metrics = train_fn(cfg)
    except (ConfigError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0
