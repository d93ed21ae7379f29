"""THE learner loop: PPO with a per-token KL penalty to the SFT policy (+ PPO-ptx), one linear function.

One iteration (one `policy_version`), numbered as in the code below:

1. Read `ppo.batch_size` records from the experience buffer (rank 0; stale ones dropped or
   kept by `buffer.max_policy_lag`, duplicates dropped) and ship them to every rank.
2. Forward the actor for the old log-probs and the critic for the values, each rank on
   its shard, then all-gather; measure the vLLM/learner log-prob mismatch; truncated
   importance weights if `ppo.tis_cap` > 0.
3. rewards = RM score at the last token - kl_coef * KL(actor || SFT) per token; GAE;
   whitening (all `instructrl.rl`).
4. PPO epochs over shuffled minibatches, gradient accumulation over micro-batches and
   ranks, clipped policy loss (+ ptx_coef * LM loss on pretraining text), clipped value loss.
5. Count the optimizer steps, update the KL controller, bump policy_version.
6. Broadcast the weights to the registered rollout replicas (gathered first under ZeRO-3).
7. Metrics (Prometheus + JSONL); every `checkpoint.every` iterations a checkpoint, and
   only then the ack of the records it includes (ack-on-checkpoint, docs/learner.md).

Sources: Ouyang et al. 2022 (InstructGPT) sec. 3.5 and eq. 2; Ziegler et al. 2019 and
openai/lm-human-preferences `train_policy.py` for the reward shaping, KL controller and
PPO details. Departures: ack after the checkpoint (step 7), not right after the step;
the ptx term is a per-token mean (see `instructrl.rl.ppo`).

Notation: B batch, T response tokens, W ranks, G gradient-accumulation steps.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.distributed as dist

from instructrl.learner import checkpoint, metrics
from instructrl.learner.batch import broadcast_batch, from_records
from instructrl.learner.config import LearnerConfig
from instructrl.learner.control import Control, Status
from instructrl.learner.engine import (all_gather_rows, build_engine, device, grad_accum_steps,
                                       hf_named_parameters, init_distributed, lm_forward, loss_divisor,
                                       policy_forward, resolve_backend, value_forward)
from instructrl.learner.models import load_actor, load_critic
from instructrl.rl import (AdaptiveKLController, FixedKLController, compute_gae, entropy_from_logits,
                           explained_variance, kl_estimate, kl_shaped_rewards, lm_loss, logprob_mismatch,
                           masked_mean, masked_sum, masked_var, masked_whiten, policy_loss, ppo_ptx_objective,
                           tis_weights, value_loss)

log = logging.getLogger(__name__)

# sync_fn(named_tensors, policy_version) -> an object with seconds, bytes, replicas_ok, replicas_failed
SyncFn = Callable[[Callable, int], object]


def train(cfg: LearnerConfig, *, control: Control | None = None, sync_fn: SyncFn | None = None) -> Status:
    """Run the learner until `ppo.max_steps` or a stop request; returns the final status.

    `sync_fn` replaces the weight broadcast of step 6 (tests use an in-process "replica");
    by default rank 0 broadcasts to the replicas registered in `control`.
    """
    # 0. setup: ranks, models under DeepSpeed, KL controller, ptx data, buffer (rank 0), resume
    ppo = cfg.ppo
    control = control or Control()
    rank, world = init_distributed(cfg)
    dev = device()
    torch.manual_seed(ppo.seed)
    gas = grad_accum_steps(cfg, world)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.actor_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    actor = build_engine(load_actor(cfg.model.actor_path, cfg.model.dtype), ppo.actor_lr, cfg, world)
    critic = build_engine(load_critic(cfg.model.critic_path, cfg.model.actor_path, cfg.model.dtype),
                          ppo.critic_lr, cfg, world)
    kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
              else FixedKLController(ppo.kl_coef))
    ptx = None
    if ppo.ptx_coef > 0:
        from instructrl.learner.ptx import PtxData
        ptx = PtxData(ppo.ptx_data, tokenizer, ppo.ptx_batch_size, ppo.ptx_max_len, ppo.seed, rank, world)
    counters = {"policy_version": 0, "optimizer_steps": 0, "samples_trained": 0}
    reader = jsonl = coordinator = None
    if rank == 0:
        from instructrl.buffer import ExperienceBuffer
        from instructrl.learner.reader import ExperienceReader
        reader = ExperienceReader(ExperienceBuffer.open(cfg.buffer), cfg.consumer, ppo.batch_size)
        jsonl = metrics.JsonlLog(cfg.jsonl_path())
        if sync_fn is None and cfg.sync.enabled:
            from instructrl.weight_sync import WeightSyncCoordinator
            coordinator = WeightSyncCoordinator(cfg.sync.master_addr, cfg.sync.master_port,
                                                resolve_backend(cfg.sync.backend), cfg.sync.timeout_s,
                                                cfg.sync.bucket_mb)
            sync_fn = coordinator.sync
    last_ckpt = checkpoint.latest(cfg.checkpoint.dir) if cfg.checkpoint.resume else None
    if last_ckpt:  # resume: models, optimizers, RNG, counters, KL controller, ptx position
        saved = checkpoint.load(last_ckpt, actor, critic, rank=rank, world=world)
        counters = {k: int(saved[k]) for k in counters}
        kl_ctl.load_state_dict(saved["kl_controller"])
        if ptx is not None and saved.get("ptx"):
            ptx.load_state_dict(saved["ptx"])
        if reader is not None:  # replay the ack of what that checkpoint trained on
            reader.commit_saved(saved["uncommitted"], tag=f"v{counters['policy_version']}")
        log.info("resumed from %s at policy_version %d", last_ckpt, counters["policy_version"])
    control.publish(policy_version=counters["policy_version"], step=counters["optimizer_steps"],
                    kl_coef=kl_ctl.value, last_checkpoint=last_ckpt or "",
                    samples_trained=counters["samples_trained"])
    control.ready.set()
    saved_version = counters["policy_version"] if last_ckpt else -1

    def save(path: str = "") -> str:
        """Checkpoint (a collective); after a regular one, rank 0 acks the records it includes."""
        nonlocal saved_version
        if not path and saved_version == counters["policy_version"]:  # nothing trained since: keep it
            return checkpoint.step_dir(cfg.checkpoint.dir, saved_version)
        state = {**counters, "kl_controller": kl_ctl.state_dict(), "ptx": ptx.state_dict() if ptx else None,
                 "consumer": cfg.consumer, "uncommitted": reader.uncommitted() if reader else [],
                 "world_size": world}
        out = checkpoint.save(path or checkpoint.step_dir(cfg.checkpoint.dir, counters["policy_version"]),
                              actor, critic, state, rank=rank, save_hf=cfg.checkpoint.save_hf,
                              tokenizer_dir=cfg.model.actor_path)
        if rank == 0 and not path:  # resume reads checkpoint.dir only: ack what is durable there
            checkpoint.prune(cfg.checkpoint.dir, cfg.checkpoint.keep)
            reader.commit(tag=f"v{counters['policy_version']}")
            control.publish(last_checkpoint=out)
        if not path:
            saved_version = counters["policy_version"]
        return out

    while True:
        phases: dict[str, float] = {}
        # 1. batch: rank 0 reads fresh records (stale dropped/kept, duplicates dropped) and ships them
        t0 = time.perf_counter()
        records = lags = save_request = None
        flags = {"stop": 0, "save": 0, "sync": 0}
        if rank == 0:
            done = 0 < ppo.max_steps <= counters["policy_version"]
            got = None if done else reader.fill(counters["policy_version"],
                                                lambda: control.stop.is_set() or control.save_requested())
            records, lags = got if got else (None, None)
            save_request = control.take_save_request() if control.save_requested() else None
            flags = {"stop": int(done or control.stop.is_set()), "save": int(save_request is not None),
                     "sync": int(sync_fn is not None and cfg.sync.enabled
                                 and (counters["policy_version"] + 1) % cfg.sync.every == 0
                                 and (coordinator is None or bool(control.replicas())))}
        batch = from_records(records, lags, pad_id) if records else None
        batch, flags, save_path = broadcast_batch(batch, flags, save_request[0] if save_request else "", dev)
        if batch is None:  # woken by a stop or checkpoint request (or max_steps) with nothing to train
            out = ""
            if flags["save"] or flags["stop"]:
                out = save(save_path if flags["save"] else "")
            if save_request:
                save_request[1].set_result((out, counters["optimizer_steps"]))
            if flags["stop"]:
                break
            continue
        B, mask = len(batch), batch.response_mask
        phases["read"] = time.perf_counter() - t0

        # 2. old log-probs (actor) and values (critic) on this rank's shard, gathered; mismatch vs vLLM
        t0 = time.perf_counter()
        shard = batch.rows(slice(rank * B // world, (rank + 1) * B // world))
        parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "values": [], "entropy": []}
        with torch.no_grad():
            for i in range(0, len(shard), ppo.micro_batch_size):
                micro = shard.rows(slice(i, i + ppo.micro_batch_size))
                logprobs, logits = policy_forward(actor, micro, ppo.temperature)
                parts["logprobs"].append(logprobs)
                parts["entropy"].append(entropy_from_logits(logits))
                parts["values"].append(value_forward(critic, micro))
        old_logprobs, old_values, entropy = (all_gather_rows(torch.cat(parts[k])) for k in
                                             ("logprobs", "values", "entropy"))  # (B, T) each
        mismatch = logprob_mismatch(old_logprobs, batch.sampling_logprobs, mask)
        is_weights = (tis_weights(old_logprobs, batch.sampling_logprobs, mask, ppo.tis_cap)
                      if ppo.tis_cap > 0 else None)  # w_t = min(pi_old / pi_sampler, C)
        phases["forward"] = time.perf_counter() - t0

        # 3. rewards = score at the last token - kl_coef * KL_t; GAE; whitening
        t0 = time.perf_counter()
        rewards, kl = kl_shaped_rewards(batch.scores, old_logprobs, batch.ref_logprobs, mask,
                                        kl_ctl.value, ppo.kl_kind)  # (B, T)
        advantages, returns = compute_gae(rewards, old_values, mask, ppo.gamma, ppo.lam)  # (B, T)
        adv_mean, adv_std = masked_mean(advantages, mask), masked_var(advantages, mask, unbiased=False).sqrt()
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        kl_per_seq = masked_sum(kl_estimate(old_logprobs, batch.ref_logprobs, mask, "k1"), mask, dim=1)  # (B,)
        phases["advantages"] = time.perf_counter() - t0

        # 4. PPO epochs: shuffled minibatches = W ranks x G micro-batches; one optimizer step each
        t0 = time.perf_counter()
        sums = torch.zeros(7, dtype=torch.float64)  # policy, value, approx_kl, clip_frac (token sums), tokens, ptx, ptx n
        shuffle = torch.Generator().manual_seed(ppo.seed * 1_000_003 + counters["policy_version"])
        for _epoch in range(ppo.epochs):
            order = torch.randperm(B, generator=shuffle)
            for start in range(0, B, ppo.minibatch_size):
                minibatch = order[start:start + ppo.minibatch_size]
                divisor = loss_divisor(int(mask[minibatch].sum()), world, gas)  # N_minibatch / (W * G)
                for idx in minibatch.view(world, gas, ppo.micro_batch_size)[rank]:  # this rank's micro-batches
                    micro, micro_mask = batch.rows(idx), mask[idx]
                    logprobs, _ = policy_forward(actor, micro, ppo.temperature)
                    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs[idx], advantages[idx], micro_mask,
                                                    ppo.clip_range, is_weights[idx] if is_weights is not None else None,
                                                    num_tokens=divisor)
                    loss = pg_loss
                    if ptx is not None:  # PPO-ptx: + gamma * LM loss on pretraining text
                        ptx_ids, ptx_mask, ptx_labels = ptx.next_batch()
                        ptx_loss = lm_loss(lm_forward(actor, ptx_ids, ptx_mask), ptx_labels)
                        loss = ppo_ptx_objective(pg_loss, ptx_loss, ppo.ptx_coef)
                        sums[5] += ptx_loss.item()
                        sums[6] += 1
                    actor.backward(loss)
                    values = value_forward(critic, micro)
                    vf_loss, _ = value_loss(values, old_values[idx], returns[idx], micro_mask,
                                            ppo.clip_range_value or None, num_tokens=divisor)
                    critic.backward(vf_loss)
                    actor.step()  # DeepSpeed steps the optimizer (with clipping) at the G-th micro-batch only
                    critic.step()
                    n = float(micro_mask.sum())
                    sums += torch.tensor([pg_loss.item() * divisor, vf_loss.item() * divisor,
                                          pg_stats["approx_kl"].item() * n, pg_stats["clip_fraction"].item() * n,
                                          n, 0.0, 0.0], dtype=torch.float64)
        if world > 1:
            on_device = sums.to(dev)
            dist.all_reduce(on_device)
            sums = on_device.cpu()
        phases["ppo"] = time.perf_counter() - t0

        # 5. optimizer steps, KL controller, policy_version
        counters["optimizer_steps"] += ppo.epochs * (B // ppo.minibatch_size)
        counters["samples_trained"] += B
        kl_ctl.update(float(kl_per_seq.mean()), B)
        counters["policy_version"] += 1

        # 6. weight broadcast to the rollout replicas (rank 0; every rank gathers under ZeRO-3)
        t0 = time.perf_counter()
        sync_result = None
        if flags["sync"]:
            params = hf_named_parameters(actor, rank)
            if rank == 0:
                if coordinator is not None:
                    coordinator.set_replicas(list(control.replicas().values()))
                try:  # a replica's failure is reported in the result; anything else must not stop training
                    sync_result = sync_fn(lambda: iter(params), counters["policy_version"])
                    metrics.record_sync(sync_result.seconds, sync_result.bytes, len(sync_result.replicas_ok),
                                        len(sync_result.replicas_failed))
                    for rid in control.record_sync(sync_result.replicas_ok, sync_result.replicas_failed,
                                                   cfg.sync.evict_after_failures):
                        log.warning("replica %s failed %d syncs in a row; forgotten until it registers again",
                                    rid, cfg.sync.evict_after_failures)
                except Exception:  # noqa: BLE001
                    log.exception("weight sync of v%d failed", counters["policy_version"])
                    metrics.SYNC_FAILURES.inc()
            del params
        phases["sync"] = time.perf_counter() - t0

        # 7. metrics; checkpoint every N iterations (or on request / at the end), then ack
        t0 = time.perf_counter()
        finished = 0 < ppo.max_steps <= counters["policy_version"]
        due = counters["policy_version"] % cfg.checkpoint.every == 0 or finished
        copy = save(save_path) if flags["save"] and save_path else ""  # requested elsewhere: not a resume point
        regular = save() if due or (flags["save"] and not save_path) else ""
        if save_request:
            save_request[1].set_result((copy or regular, counters["optimizer_steps"]))
        phases["checkpoint"] = time.perf_counter() - t0
        if rank == 0:
            tokens = float(sums[4]) / max(ppo.epochs, 1)
            stats = {
                **counters, "kl_coef": kl_ctl.value,
                "reward_mean": float(masked_sum(rewards, mask, dim=1).mean()),
                "score_mean": float(batch.scores.mean()),
                "kl_to_ref": float(kl_per_seq.mean()),
                "entropy": float(masked_mean(entropy, mask)),
                "approx_kl": float(sums[2] / sums[4]), "clip_fraction": float(sums[3] / sums[4]),
                "policy_loss": float(sums[0] / sums[4]), "value_loss": float(sums[1] / sums[4]),
                "ptx_loss": float(sums[5] / sums[6]) if sums[6] else None,
                "explained_variance": float(explained_variance(old_values, returns, mask)),
                "response_length_mean": float(mask.sum(1).mean()),
                "advantage_mean": float(adv_mean), "advantage_std": float(adv_std),
                "logprob_mismatch_kl": float(mismatch["kl"]),
                "logprob_mismatch_max_abs": float(mismatch["max_abs_diff"]),
                "tokens_per_second": tokens / max(phases["forward"] + phases["ppo"], 1e-9),
                "policy_lag_mean": float(batch.lags.float().mean()),
                "stale_dropped": reader.stale_dropped, "duplicates": reader.duplicates,
            }
            metrics.publish(stats, phases, batch.lags.tolist())
            record = {**stats, "time": time.time(), "phase_seconds": phases}
            if sync_result is not None:
                record.update(sync_seconds=sync_result.seconds, sync_bytes=sync_result.bytes,
                              sync_replicas_ok=len(sync_result.replicas_ok),
                              sync_replicas_failed=len(sync_result.replicas_failed))
            if cfg.logging.log_sample_ids:
                record["sample_ids"] = [r.sample_id for r in records]
            jsonl.write(record)
            control.publish(policy_version=counters["policy_version"], step=counters["optimizer_steps"],
                            kl_coef=kl_ctl.value, samples_trained=counters["samples_trained"])
            log.info("v%d reward %.4f score %.4f kl %.4f loss %.4f/%.4f (%.2fs)", counters["policy_version"],
                     stats["reward_mean"], stats["score_mean"], stats["kl_to_ref"], stats["policy_loss"],
                     stats["value_loss"], sum(phases.values()))
        if finished:
            break

    if rank == 0:
        jsonl.close()
        reader.buffer.close()
        if coordinator is not None:
            coordinator.close()
        control.fail_pending(RuntimeError("the learner stopped"))
    return control.status()  # the process group stays: DeepSpeed caches it (a later train() reuses it)
