"""THE learner loop: PPO with a per-token KL penalty to the SFT policy (+ PPO-ptx).

`train` reads top to bottom; one iteration (one batch, one `policy_version`) is these steps,
each a function below (2-4, the PPO math, in `instructrl.learner.update`):

1. Read `ppo.batch_size` records from the experience buffer (rank 0; stale ones dropped or
   kept by `pacing.max_policy_lag`, duplicates dropped) and ship them to every rank, with
   the stop / checkpoint-request / sync decisions, so that every rank takes the same branch.
2. Forward the actor for the old log-probs and the critic for the values, each rank on
   its shard, then all-gather; measure the vLLM/learner log-prob mismatch; truncated
   importance weights if `ppo.tis_cap` > 0.
3. rewards = RM score at the last token - kl_coef * KL(actor || SFT) per token; GAE;
   whitening (all `instructrl.rl`).
4. PPO epochs over shuffled minibatches, gradient accumulation over micro-batches and
   ranks, clipped policy loss (+ ptx_coef * LM loss on pretraining text), clipped value loss.
5. Count the optimizer steps, update the KL controller, bump policy_version.
   Publish the new version to the rollout workers' admission rule (docs/pacing.md).
6. Broadcast the weights to the registered rollout replicas (gathered first under ZeRO-3).
   A replica that registers behind (or ahead of) the learner gets the current weights at
   once: a catch-up sync wakes step 1 and runs without a batch.
7. Every `checkpoint.every` iterations a checkpoint, and only then the ack of the records
   it includes (ack-on-checkpoint, docs/learner.md); metrics (Prometheus + JSONL).

Names: an *iteration* trains one batch and makes one `policy_version`; an *optimizer step*
is one minibatch (`ppo.epochs * batch_size / minibatch_size` of them per iteration).

Sources: Ouyang et al. 2022 (InstructGPT) sec. 3.5 and eq. 2; Ziegler et al. 2019 and
openai/lm-human-preferences `train_policy.py` for the reward shaping, KL controller and
PPO details. Departures: ack after the checkpoint (step 7), not right after the step;
the ptx term is a per-token mean (see `instructrl.rl.ppo`).

Notation: B batch, T response tokens, W ranks, G gradient-accumulation steps.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from instructrl.deepspeed_setup import device, init_distributed, resolve_backend
from instructrl.learner import checkpoint, metrics
from instructrl.learner.batch import ExperienceBatch, broadcast_batch, from_records
from instructrl.learner.config import LearnerConfig
from instructrl.learner.control import Control, Status
from instructrl.learner.models import (
    actor_and_critic,
    checkpoint_named_parameters,
    grad_accum_steps,
    hf_named_parameters,
)
from instructrl.learner.update import (
    Advantages,
    iteration_stats,
    old_logprobs_and_values,
    ppo_epochs,
    shaped_rewards_and_advantages,
)
from instructrl.rl import AdaptiveKLController, FixedKLController

if TYPE_CHECKING:
    from instructrl.learner.ptx import PtxData
    from instructrl.learner.reader import ExperienceReader
    from instructrl.weight_sync import SyncResult, WeightSyncCoordinator

log = logging.getLogger(__name__)

# sync_fn(named_tensors, policy_version) -> SyncResult (seconds, bytes, replicas_ok, replicas_failed)
SyncFn = Callable[[Callable, int], "SyncResult"]


def train(cfg: LearnerConfig, *, control: Control | None = None, sync_fn: SyncFn | None = None) -> Status:
    """Run the learner until `ppo.max_iterations` or a stop request; returns the final status.

    `sync_fn` replaces the weight broadcast of step 6 (tests use an in-process "replica");
    by default rank 0 broadcasts to the replicas registered in `control`.
    """
    control = control or Control(cfg.checkpoint.dir, cfg.register_allow)
    run = setup(cfg, control, sync_fn)  # 0. ranks, engines, KL controller, ptx data, buffer, resume
    ppo = cfg.ppo
    while True:
        phases: dict[str, float] = {}
        with timed(phases, "read"):
            it = read_batch(run, control)  # 1. batch (rank 0 reads, every rank receives)
        if it.batch is None:  # woken by a stop or a checkpoint request (or done) with nothing to train
            if answer_without_batch(run, control, it):
                break
            continue
        with timed(phases, "forward"):  # 2. old log-probs and values, gathered; mismatch vs vLLM
            old = old_logprobs_and_values(run.actor, run.critic, it.batch, ppo, run.rank, run.world)
        with timed(phases, "advantages"):  # 3. rewards = score - kl_coef * KL_t; GAE; whitening
            adv = shaped_rewards_and_advantages(it.batch, old, run.kl_ctl.value, ppo)
        with timed(phases, "ppo"):  # 4. PPO epochs: one optimizer step per minibatch
            stats = ppo_epochs(run.actor, run.critic, it.batch, old, adv, run.ptx, ppo,
                               policy_version=run.policy_version, rank=run.rank, world=run.world,
                               gas=run.gas, device=run.device)
        count_iteration(run, len(it.batch), adv)  # 5. optimizer steps, KL controller, policy_version ...
        if run.reader is not None:  # ... published to the workers' admission rule
            run.reader.publish(run.policy_version, finished=run.finished())
        with timed(phases, "sync"):
            synced = sync_weights(run, control, it.sync)  # 6. weights to the rollout replicas
        record = None
        if run.rank == 0:  # 7. the JSONL line first: every iteration a checkpoint holds is in the log ...
            record = log_iteration(run, it, iteration_stats(it.batch, old, adv, stats), stats.tokens, phases, synced)
        with timed(phases, "checkpoint"):
            finished = checkpoint_and_answer(run, control, it)  # ... then the checkpoint (then ack) ...
        if record is not None:  # ... and the metrics and status
            publish_iteration(run, control, it, record, phases)
        if finished:
            break
    close(run, control)
    return control.status()  # the process group stays: DeepSpeed caches it (a later train() reuses it)


@dataclasses.dataclass
class Run:
    """What the loop carries from one iteration to the next."""

    cfg: LearnerConfig
    rank: int
    world: int
    device: torch.device
    gas: int  # G
    pad_id: int
    actor: Any  # DeepSpeed engines
    critic: Any
    kl_ctl: AdaptiveKLController | FixedKLController
    ptx: PtxData | None  # None without PPO-ptx
    policy_version: int = 0  # iterations trained by this run's lineage
    optimizer_step: int = 0  # optimizer steps of that lineage
    samples_trained: int = 0
    saved_version: int = -1  # policy_version of the newest regular checkpoint (-1: none yet)
    reader: ExperienceReader | None = None  # rank 0: buffer reader, JSONL log, weight sync
    jsonl: metrics.JsonlLog | None = None
    coordinator: WeightSyncCoordinator | None = None
    sync_fn: SyncFn | None = None

    def finished(self) -> bool:
        return 0 < self.cfg.ppo.max_iterations <= self.policy_version


@dataclasses.dataclass
class Iteration:
    """Step 1's result: the batch and rank 0's decisions, the same on every rank."""

    batch: ExperienceBatch | None  # on this rank's device; None: nothing to train
    stop: bool
    save: bool  # a SaveCheckpoint request is to be answered
    sync: bool  # broadcast the weights after this iteration
    save_path: str  # the request's path ("" = the regular checkpoint)
    records: list  # rank 0: the records of `batch`
    request: concurrent.futures.Future | None  # rank 0: the request's future, gets (path, optimizer_step)


@contextlib.contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - t0


def setup(cfg: LearnerConfig, control: Control, sync_fn: SyncFn | None) -> Run:
    """0. Ranks, actor and critic engines, KL controller, ptx data, buffer (rank 0), resume."""
    from transformers import AutoTokenizer

    ppo = cfg.ppo
    rank, world = init_distributed(cfg.deepspeed.backend, cfg.deepspeed.torch_threads)
    torch.manual_seed(ppo.seed)
    gas = grad_accum_steps(cfg, world)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.actor_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    actor, critic = actor_and_critic(cfg, world)
    kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
              else FixedKLController(ppo.kl_coef))
    ptx = None
    if ppo.ptx_coef > 0:
        from instructrl.learner.ptx import PtxData
        ptx = PtxData(ppo.ptx_data, tokenizer, ppo.ptx_batch_size, ppo.ptx_max_len, ppo.seed, rank, world)
    run = Run(cfg, rank, world, device(), gas, pad_id, actor, critic, kl_ctl, ptx)
    if rank == 0:
        from instructrl.buffer import ExperienceBuffer
        from instructrl.learner.reader import ExperienceReader
        run.reader = ExperienceReader(ExperienceBuffer.open(cfg.buffer), cfg.consumer, ppo.batch_size, cfg.pacing,
                                      ppo.temperature)
        run.jsonl = metrics.JsonlLog(cfg.jsonl_path())
        run.sync_fn = sync_fn
        if sync_fn is None and cfg.sync.enabled:
            from instructrl.weight_sync import WeightSyncCoordinator
            s = cfg.sync
            run.coordinator = WeightSyncCoordinator(s.master_addr, s.master_port, resolve_backend(s.backend),
                                                    s.timeout_s, s.bucket_mb)
            run.sync_fn = run.coordinator.sync
    last = checkpoint.latest(cfg.checkpoint.dir) if cfg.checkpoint.resume else None
    if last:
        resume(run, last)
    if run.reader is not None:
        run.reader.publish(run.policy_version, finished=run.finished())
    control.publish(max_iterations=ppo.max_iterations, finished=run.finished(),
                    max_policy_lag=-1 if cfg.pacing.max_policy_lag is None else cfg.pacing.max_policy_lag)
    control.publish(policy_version=run.policy_version, optimizer_step=run.optimizer_step, kl_coef=kl_ctl.value,
                    last_checkpoint=last or "", samples_trained=run.samples_trained)
    control.ready.set()
    return run


def resume(run: Run, path: str) -> None:
    """Models, optimizers, RNG, counters, KL controller, ptx position; replay the checkpoint's ack."""
    saved = checkpoint.load(path, run.actor, run.critic, rank=run.rank, world=run.world)
    run.policy_version, run.optimizer_step = int(saved["policy_version"]), int(saved["optimizer_step"])
    run.samples_trained = int(saved["samples_trained"])
    run.saved_version = run.policy_version
    run.kl_ctl.load_state_dict(saved["kl_controller"])
    if run.ptx is not None and saved.get("ptx"):
        run.ptx.load_state_dict(saved["ptx"])
    if run.reader is not None:  # acked only after the checkpoint: ack what it includes (again)
        run.reader.commit_saved(saved["uncommitted"], tag=f"v{run.policy_version}")
    log.info("resumed from %s at policy_version %d", path, run.policy_version)


def read_batch(run: Run, control: Control) -> Iteration:
    """1. Rank 0 reads fresh records (stale dropped/kept, duplicates dropped) and ships them with its decisions.

    The read gives way to a stop, a checkpoint request or a catch-up sync (a replica that
    registered behind the learner): those are answered without a batch.
    """
    records = lags = request = None
    flags = {"stop": 0, "save": 0, "sync": 0}
    if run.rank == 0:
        assert run.reader is not None  # rank 0 reads the buffer
        done = run.finished()
        syncing = run.sync_fn is not None and run.cfg.sync.enabled
        got = None if done else run.reader.fill(run.policy_version, lambda: control.stop.is_set()
                                                or control.save_requested()
                                                or (syncing and control.catch_up_requested()))
        records, lags = got if got else (None, None)
        request = control.take_save_request()
        regular = syncing and (run.policy_version + 1) % run.cfg.sync.every == 0
        catch_up = syncing and control.take_catch_up()
        flags = {"stop": int(done or control.stop.is_set()), "save": int(request is not None),
                 "sync": int((regular or catch_up) and (run.coordinator is None or bool(control.replicas())))}
    batch = from_records(records, lags, run.pad_id) if records and lags is not None else None
    batch, flags, save_path = broadcast_batch(batch, flags, request[0] if request else "", run.device)
    return Iteration(batch, bool(flags["stop"]), bool(flags["save"]), bool(flags["sync"]), save_path,
                     records or [], request[1] if request else None)


def answer_without_batch(run: Run, control: Control, it: Iteration) -> bool:
    """No batch: a catch-up sync of the current weights, the requested (or, on stop, the final)
    checkpoint; True = stop."""
    if it.sync and not it.stop:
        sync_weights(run, control, True)
    out = save_checkpoint(run, control, it.save_path if it.save else "") if it.save or it.stop else ""
    if it.request is not None:
        it.request.set_result((out, run.optimizer_step))
    return it.stop


def count_iteration(run: Run, batch_size: int, adv: Advantages) -> None:
    """5. Optimizer steps and samples counted, KL controller updated, policy_version += 1."""
    ppo = run.cfg.ppo
    run.optimizer_step += ppo.epochs * (batch_size // ppo.minibatch_size)
    run.samples_trained += batch_size
    run.kl_ctl.update(float(adv.kl_per_seq.mean()), batch_size)
    run.policy_version += 1


def sync_weights(run: Run, control: Control, due: bool) -> SyncResult | None:
    """6. Weight broadcast to the rollout replicas (rank 0; every rank gathers under ZeRO-3).

    Returns the sync result on rank 0 (None if none was due, or the broadcast raised). A
    replica's failure is in the result; anything else is logged and counted, and training
    goes on.
    """
    if not due:
        return None
    params = hf_named_parameters(run.actor, run.rank)
    if run.rank != 0:
        return None
    params = checkpoint_named_parameters(run.actor.module, params)  # the names vLLM's loaders take
    if run.coordinator is not None:
        run.coordinator.set_replicas(list(control.replicas().values()))
    evict_after, result = run.cfg.sync.evict_after_failures, None
    assert run.sync_fn is not None  # called only where syncing is on
    try:
        result = run.sync_fn(lambda: iter(params), run.policy_version)
        metrics.record_sync(result.seconds, result.bytes, len(result.replicas_ok), len(result.replicas_failed))
        for rid in control.record_sync(result.replicas_ok, result.replicas_failed, evict_after, run.policy_version):
            log.warning("replica %s failed %d syncs in a row; forgotten until it registers again", rid, evict_after)
    except Exception:  # noqa: BLE001
        log.exception("weight sync of v%d failed", run.policy_version)
        metrics.SYNC_FAILURES.inc()
    return result


def checkpoint_and_answer(run: Run, control: Control, it: Iteration) -> bool:
    """7. Checkpoint every `checkpoint.every` iterations, at the end, or on request; True = finished."""
    finished = run.finished()
    due = run.policy_version % run.cfg.checkpoint.every == 0 or finished
    copy = save_checkpoint(run, control, it.save_path) if it.save and it.save_path else ""  # not a resume point
    regular = save_checkpoint(run, control) if due or (it.save and not it.save_path) else ""
    if it.request is not None:
        it.request.set_result((copy or regular, run.optimizer_step))
    return finished


def save_checkpoint(run: Run, control: Control, path: str = "") -> str:
    """A checkpoint (a collective); after a regular one (`path` empty), rank 0 acks the records it includes."""
    cfg = run.cfg.checkpoint
    if not path and run.saved_version == run.policy_version:  # nothing trained since: keep it
        return checkpoint.iteration_dir(cfg.dir, run.saved_version)
    state = {"policy_version": run.policy_version, "optimizer_step": run.optimizer_step,
             "samples_trained": run.samples_trained, "kl_controller": run.kl_ctl.state_dict(),
             "ptx": run.ptx.state_dict() if run.ptx else None, "consumer": run.cfg.consumer,
             "uncommitted": run.reader.uncommitted() if run.reader else [], "world_size": run.world}
    out = checkpoint.save(path or checkpoint.iteration_dir(cfg.dir, run.policy_version), run.actor, run.critic,
                          state, rank=run.rank, save_hf=cfg.save_hf, source_dir=run.cfg.model.actor_path)
    if not path:
        run.saved_version = run.policy_version
        if run.rank == 0:  # resume reads checkpoint.dir only: ack what is durable there
            assert run.reader is not None
            checkpoint.prune(cfg.dir, cfg.keep)
            run.reader.commit(tag=f"v{run.policy_version}")
            control.publish(last_checkpoint=out)
    return out


def log_iteration(run: Run, it: Iteration, stats: dict[str, Any], tokens: float, phases: dict[str, float],
                  synced: SyncResult | None) -> dict[str, Any]:
    """7. One JSONL line (rank 0), written before the iteration's checkpoint: a learner killed
    after the checkpoint resumes past this iteration and would never log it again, so the
    trained log (`sample_ids`) of the lineage would miss records the checkpoint committed.
    A kill before the checkpoint re-trains the iteration, and its later line supersedes this one."""
    assert it.batch is not None and run.jsonl is not None and run.reader is not None
    record = {"policy_version": run.policy_version, "optimizer_step": run.optimizer_step,
              "samples_trained": run.samples_trained, "kl_coef": run.kl_ctl.value, **stats,
              "tokens_per_second": tokens / max(run.cfg.ppo.epochs, 1) / max(phases["forward"] + phases["ppo"], 1e-9),
              "stale_dropped": run.reader.stale_dropped, "duplicates": run.reader.duplicates,
              "wrong_temperature": run.reader.wrong_temperature}
    line = {**record, "time": time.time(), "phase_seconds": dict(phases),  # the checkpoint is not yet written
            "buffer_depth": run.reader.buffer.depth()}
    if synced is not None:
        line.update(sync_seconds=synced.seconds, sync_bytes=synced.bytes, sync_replicas_ok=len(synced.replicas_ok),
                    sync_replicas_failed=len(synced.replicas_failed))
    if run.cfg.logging.log_sample_ids:
        line["sample_ids"] = [r.sample_id for r in it.records]
    run.jsonl.write(line)
    return record


def publish_iteration(run: Run, control: Control, it: Iteration, record: dict[str, Any],
                      phases: dict[str, float]) -> None:
    """7. Prometheus gauges (every phase, the checkpoint's too) and the status (rank 0)."""
    assert it.batch is not None and run.reader is not None
    metrics.publish(record, phases, it.batch.lags.tolist())
    control.publish(policy_version=run.policy_version, optimizer_step=run.optimizer_step, kl_coef=run.kl_ctl.value,
                    samples_trained=run.samples_trained, finished=run.finished(),
                    policy_lag_mean=record["policy_lag_mean"], stale_dropped=run.reader.stale_dropped,
                    buffer_depth=run.reader.buffer.depth(), outstanding=run.reader.admission.outstanding())
    log.info("v%d reward %.4f score %.4f kl %.4f loss %.4f/%.4f (%.2fs)", run.policy_version, record["reward_mean"],
             record["score_mean"], record["kl_to_ref"], record["policy_loss"], record["value_loss"],
             sum(phases.values()))


def close(run: Run, control: Control) -> None:
    """Rank 0 closes the JSONL log, the buffer and the weight group, and fails pending checkpoint requests."""
    if run.rank != 0:
        return
    assert run.jsonl is not None and run.reader is not None  # rank 0 opened both in setup
    run.jsonl.close()
    run.reader.buffer.close()
    if run.coordinator is not None:
        run.coordinator.close()
    control.fail_pending(RuntimeError("the learner stopped"))
