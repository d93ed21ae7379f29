"""What an offline stage writes: the metrics log, and the model directory, atomically.

A stage writes everything (model, tokenizer, metrics log) into `<output_dir>.tmp-<pid>`
and renames it to `<output_dir>` only when training and saving succeeded; on failure the
staging directory is removed and an existing `<output_dir>` is left as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import time
from collections.abc import Iterator
from typing import Any

import torch


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

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike, rank: int = 0) -> Iterator[pathlib.Path | None]:
    """Yield a staging dir (rank 0; None elsewhere) that becomes `output_dir` only on success."""
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
    """Save a HF model (safetensors), its tokenizer and `instructrl.json` into the staging dir."""
    state = full_state_dict(module, zero_stage)
    if stage is None:
        return
    module.save_pretrained(stage, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    (stage / "instructrl.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
