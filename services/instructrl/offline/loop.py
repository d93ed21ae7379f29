"""The optimizer loop the three offline stages share: the engine with its LR schedule, the
micro-batch order, and `optimize` (forward/backward per micro-batch, an optimizer step every
`train.grad_accum_steps`, train and eval lines in the metrics log).

DeepSpeed set-up (process group, JSON config) is `instructrl.deepspeed_setup`, as for the
learner. Training is fp32 with torch's AdamW and a warm-up/decay `LambdaLR`; DeepSpeed does
gradient accumulation and clipping. Each rank takes its share of every global batch.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from instructrl.deepspeed_setup import build_engine, ds_config
from instructrl.offline.config import OptimConfig, TrainConfig
from instructrl.offline.output import MetricsLog

# one micro-batch -> (loss to backpropagate, floats for the train line, e.g. {"loss": 0.7})
StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def lr_factor(step: int, total: int, optim: OptimConfig) -> float:
    """Multiplier of `optim.lr` at optimizer step `step` of `total`."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    floor = optim.min_lr_ratio
    if optim.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def engine_for(model: torch.nn.Module, num_items: int, cfg: Any, rank: int, world: int):
    """`(engine, total optimizer steps)`: `model` under DeepSpeed with AdamW and the schedule.

    `cfg` is a stage config (its `train`, `optim` and `deepspeed` sections); `num_items` the
    training examples (SFT: sequences, RM: prompts, DPO: pairs).
    """
    from instructrl.offline.data import batch_indices

    train, optim, ds = cfg.train, cfg.optim, cfg.deepspeed
    per_epoch = len(batch_indices(num_items, train.micro_batch_size, 0, train.seed, rank, world))
    total = total_optimizer_steps(per_epoch, train)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, optim))
    config = ds_config(micro_batch_size=train.micro_batch_size, grad_accum_steps=train.grad_accum_steps,
                       grad_clip=optim.grad_clip, zero_stage=ds.zero_stage)
    return build_engine(model, opt, config, lr_scheduler=sched), total


def total_optimizer_steps(batches_per_epoch: int, train: TrainConfig) -> int:
    if train.max_steps > 0:
        return train.max_steps
    return max(1, train.epochs * math.ceil(batches_per_epoch / train.grad_accum_steps))


def micro_batches(num_items: int, train: TrainConfig, rank: int, world: int) -> Iterator[tuple[int, list[int]]]:
    """`(epoch, indices)` for every micro-batch, epoch after epoch, until the caller stops."""
    from instructrl.offline.data import batch_indices

    epoch = 0
    while True:
        batches = batch_indices(num_items, train.micro_batch_size, epoch, train.seed, rank, world)
        if not batches:
            raise ValueError(f"{num_items} training examples cannot feed {world} ranks")
        for b in batches:
            yield epoch, b
        epoch += 1


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A collated batch on the engine's device (a no-op on CPU)."""
    return {k: v.to(device) for k, v in batch.items()}


@dataclasses.dataclass
class Trained:
    steps: int  # optimizer steps taken
    last_eval: dict[str, Any]  # the final evaluation ({} without held-out data)
    seconds: float  # training and evaluation time


def optimize(engine, examples: Sequence, collate: Callable[[list], dict[str, torch.Tensor]], step_fn: StepFn,
             evaluate: Callable[[], dict[str, Any]] | None, train: TrainConfig, total_steps: int, log: MetricsLog,
             name: str, rank: int, world: int) -> Trained:
    """Train `total_steps` optimizer steps over `examples`, then evaluate.

    Every `train.log_every` steps a train line holds the means of `step_fn`'s floats since the
    last one; every `train.eval_every` steps (and at the end) an eval line holds `evaluate()`.
    """
    bar = progress_bar(total_steps, name, train.progress and rank == 0)
    # without the bar (a log file, `instructrl demo`): a plain line per train/eval line of the log
    say = (lambda rec: print(progress_line(name, total_steps, rec), flush=True)) if (  # noqa: E731
        rank == 0 and not train.progress) else (lambda rec: None)
    t0 = time.monotonic()
    step, micro, last_eval = 0, 0, {}
    running: dict[str, list[float]] = {}
    for epoch, idx in micro_batches(len(examples), train, rank, world):
        loss, floats = step_fn(to_device(collate([examples[i] for i in idx]), engine.device))
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at every grad_accum_steps-th micro-batch
        for k, v in floats.items():
            running.setdefault(k, []).append(v)
        micro += 1
        if micro % train.grad_accum_steps:
            continue
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v[-1]:.3f}" for k, v in running.items()})
        if step % train.log_every == 0 or step == total_steps:
            line = log.write({"step": step, "epoch": epoch, "split": "train",
                              **{k: mean_of(v) for k, v in running.items()}, "lr": engine.get_lr()[0]})
            say(line)
            running = {}
        if evaluate and train.eval_every and step % train.eval_every == 0 and step < total_steps:
            last_eval = evaluate()
            say(log.write({"step": step, "split": "eval", **last_eval}))
        if step >= total_steps:
            break
    bar.close()
    if evaluate:
        last_eval = evaluate()
        say(log.write({"step": step, "split": "eval", **last_eval}))
    return Trained(step, last_eval, round(time.monotonic() - t0, 2))


def progress_line(name: str, total: int, record: dict[str, Any]) -> str:
    """`sft step 20/150 train: loss 2.1033 lr 0.0010` from a train or eval line of the metrics log."""
    figures = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                        if k not in ("step", "epoch", "split", "elapsed_s") and isinstance(v, float | int)
                        and not isinstance(v, bool))
    return f"{name} step {record['step']}/{total} {record['split']}: {figures}"


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def mean_of(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
