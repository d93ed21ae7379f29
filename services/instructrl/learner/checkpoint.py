"""Learner checkpoints: actor, critic, optimizers (DeepSpeed), learner state, RNG; atomic; last K kept.

Layout of `<dir>/iteration-NNNNNNNN/` (one per saved policy_version, NNNNNNNN):

    actor/, critic/     DeepSpeed engine checkpoints (module, optimizer and ZeRO shards)
    actor_hf/           the actor as a Hugging Face directory (optional; servable by vLLM)
                        with the tokenizer and the prompt format (instructrl.json) of
                        the model it was trained from (`model.actor_path`)
    state.json          learner state: policy_version, optimizer_step, samples_trained,
                        KL controller, ptx position, consumer, the uncommitted records
                        (see docs/learner.md), world_size
    rng-rank<R>.json    torch / python RNG states of rank R
    universal/          written on a resume with another rank count under ZeRO 1-3: the
                        actor and critic re-expressed per parameter (DeepSpeed's universal
                        checkpoint), from which any number of ranks loads

Atomicity: every rank writes into `<dir>/.tmp-iteration-NNNNNNNN/`, files are fsynced, then
rank 0 renames it to `iteration-NNNNNNNN` (one `rename`: a reader sees all or nothing) and
deletes the oldest beyond `keep`. `latest()` is the highest complete iteration directory.
DeepSpeed stores its part with `torch.save`; those files are read back only by this
learner from its own checkpoint directory (trusted local files), never received from
another process. Our own state is JSON.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist

from instructrl.learner.models import hf_named_parameters
from instructrl.models import prompt_format

ITERATION_RE = re.compile(r"^iteration-(\d{8})$")
OLD_LAYOUT_RE = re.compile(r"^step-(\d{8})$")  # before the iteration/optimizer-step names
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*")


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def iteration_dir(root: str, version: int) -> str:
    return os.path.join(root, f"iteration-{version:08d}")


def latest(root: str) -> str | None:
    """The newest complete checkpoint directory under `root`, or None.

    Raises ValueError if `root` holds only checkpoints of the old layout (`step-NNNNNNNN/`,
    with `optimizer_steps` in state.json): starting over silently would drop the training
    they hold.
    """
    if not os.path.isdir(root):
        return None
    names = os.listdir(root)
    done = sorted(d for d in names if ITERATION_RE.match(d) and os.path.exists(os.path.join(root, d, "state.json")))
    if not done and any(OLD_LAYOUT_RE.match(d) for d in names):
        raise ValueError(f"{root} holds checkpoints of an older instructrl (step-NNNNNNNN/); this version "
                         "resumes from iteration-NNNNNNNN/ (docs/learner.md). Resume them with the version "
                         "that wrote them, or move them away (or set checkpoint.resume=false) to start over")
    return os.path.join(root, done[-1]) if done else None


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "python": [version, list(internal), gauss]}


def _set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: str) -> None:
    """fsync a file or a directory (a directory: its entries, e.g. a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for d, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(d, name))
        _fsync(d)


def _save_hf(hf_dir: str, actor, hf_params, source_dir: str, state: dict) -> None:
    """The actor as a HF directory, with the tokenizer files and the prompt format of `source_dir`
    (the model it was trained from), so that a reload or `instructrl sample` formats prompts as
    the rollout did."""
    actor.module.save_pretrained(hf_dir, state_dict=dict(hf_params), safe_serialization=True)
    if not source_dir:
        return
    for pattern in TOKENIZER_FILES:
        for f in glob.glob(os.path.join(source_dir, pattern)):
            shutil.copy(f, hf_dir)
    _write_json(os.path.join(hf_dir, prompt_format.METADATA),
                {"stage": "ppo", "base_model": source_dir, "policy_version": state["policy_version"],
                 "prompt_format": prompt_format.of_model(source_dir)})


def save(path: str, actor, critic, state: dict, *, rank: int, save_hf: bool, source_dir: str = "") -> str:
    """Write a checkpoint to `path` atomically; a collective (every rank calls it). Returns `path`.

    `source_dir`: the model the actor was loaded from (its tokenizer and prompt format go into actor_hf/)."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{name}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
        os.makedirs(tmp)
    _barrier()
    actor.save_checkpoint(tmp, tag="actor", save_latest=False)
    critic.save_checkpoint(tmp, tag="critic", save_latest=False)
    hf_params = hf_named_parameters(actor, rank) if save_hf else []
    _write_json(os.path.join(tmp, f"rng-rank{rank}.json"), _rng_state())
    _barrier()
    if rank == 0:
        if save_hf:
            _save_hf(os.path.join(tmp, "actor_hf"), actor, hf_params, source_dir, state)
        _write_json(os.path.join(tmp, "state.json"), state)  # last: its presence marks a complete save
        _fsync_tree(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        _fsync(parent)
    _barrier()
    return path


def prune(root: str, keep: int) -> None:
    """Delete all but the newest `keep` iteration directories of `root` (rank 0 only)."""
    done = sorted(d for d in os.listdir(root) if ITERATION_RE.match(d))
    for d in done[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _universal(path: str, rank: int) -> str:
    """Rank 0 converts the actor and critic checkpoints of `path` into DeepSpeed's universal
    format (one file per parameter and optimizer moment, no rank layout) in `<path>/universal`,
    once; every rank returns that directory."""
    out = os.path.join(path, "universal")
    if rank == 0 and not os.path.exists(out):
        tmp = f"{out}.tmp-{os.getpid()}"
        for tag in ("actor", "critic"):
            # --inject_missing_state: our engines keep no Megatron-style tensor-parallel metadata
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", os.path.join(path, tag), "--output_folder", os.path.join(tmp, tag),
                   "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"converting {path}/{tag} to a universal checkpoint failed:\n"
                                   f"{done.stderr[-2000:]}")
        os.rename(tmp, out)
    _barrier()
    return out


def load(path: str, actor, critic, *, rank: int, world: int) -> dict:
    """Restore engines, optimizers and this rank's RNG from `path`; returns the learner state.

    ZeRO stages 1-3 shard the optimizer by rank. A checkpoint written by another number of
    ranks is re-sharded through DeepSpeed's universal checkpoint (converted once, next to
    it, then loaded with `load_universal`), so a learner can restart with more or fewer ranks
    and continue the same curve. Stage 0 keeps whole optimizer state and resumes on any count.
    Ranks that did not exist in the saved run start from rank 0's RNG state.
    """
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    saved_world = int(state.get("world_size", world))
    load_dir = path
    if saved_world != world and actor.zero_optimization_stage() > 0:
        load_dir = _universal(path, rank)
        for engine in (actor, critic):
            # DeepSpeed reads this flag (the ds_config key checkpoint.load_universal) at load time
            engine._config.load_universal_checkpoint = True
    for engine, tag in ((actor, "actor"), (critic, "critic")):
        loaded, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"could not load the {tag} checkpoint from {load_dir}")
    if load_dir != path:
        for engine in (actor, critic):
            engine._config.load_universal_checkpoint = False  # later saves are ordinary ones
    rng = os.path.join(path, f"rng-rank{rank}.json")
    if not os.path.exists(rng):
        rng = os.path.join(path, "rng-rank0.json")
    if os.path.exists(rng):
        with open(rng, encoding="utf-8") as f:
            _set_rng_state(json.load(f))
    return state
