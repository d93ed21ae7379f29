"""The rollout worker end to end: real Redis, real rollout (vLLM) / reward / reference servers.

Prompts go in the prompt stream; the worker claims, generates, scores (rule reward),
gets reference log-probs, writes experience and acks. With the reward service down at
first, it retries and loses nothing once the service comes up.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import redis
import torch
from redis_server import free_port

from instructrl.buffer import (
    BufferConfig,
    ExperienceBuffer,
    Keys,
    PromptQueue,
    RedisConfig,
    read_dead_letters,
    sample_id_for,
)
from instructrl.buffer.pacing import Pacing
from instructrl.buffer.streams import BufferFull
from instructrl.codec import decode, sequence
from instructrl.reward.config import RewardConfig
from instructrl.reward.server import reward_server
from instructrl.rollout.domain import Sampling
from instructrl.rollout.retry import transient
from instructrl.rollout.worker import RetryConfig, RolloutWorker, Stopped, WorkerConfig, retry
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.serving.server import ServerConfig
from instructrl.v1 import experience_pb2

N, PROMPTS = 2, 6


def test_retry_backs_off_then_succeeds_and_stops_on_request():
    calls = []

    async def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "down")
        return "ok"

    async def main():
        stop = asyncio.Event()
        assert await retry("flaky", flaky, RetryConfig(base_s=0.05, cap_s=0.1), stop) == "ok"
        with pytest.raises(grpc.aio.AioRpcError):  # not retryable
            await retry("bad", lambda: _raise(grpc.StatusCode.INVALID_ARGUMENT), RetryConfig(base_s=0.01), stop)
        stop.set()
        with pytest.raises(Stopped):
            await retry("down", lambda: _raise(grpc.StatusCode.UNAVAILABLE), RetryConfig(base_s=0.01), stop)
    asyncio.run(main())
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.1


async def _raise(code):
    raise grpc.aio.AioRpcError(code, None, None, "x")


def _rpc_error(code, details="x"):
    return grpc.aio.AioRpcError(code, None, None, details)


def test_only_transient_failures_are_retried_and_attempts_are_bounded():
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        assert transient(_rpc_error(code))
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED):
        assert not transient(_rpc_error(code, "connection reset, unavailable, timed out"))  # the code decides
    assert transient(redis.exceptions.ConnectionError()) and transient(redis.exceptions.TimeoutError())
    assert transient(BufferFull("full"))
    assert not transient(redis.exceptions.ResponseError("LOADING connection"))  # a command error: not by text
    assert not transient(RuntimeError("Connection refused"))
    calls = []

    async def down():
        calls.append(1)
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE)

    async def main():
        with pytest.raises(grpc.aio.AioRpcError):
            await retry("down", down, RetryConfig(base_s=0.001, cap_s=0.002), asyncio.Event())
    asyncio.run(main())
    assert len(calls) == RetryConfig().attempts == 10  # bounded by default


class Service:
    """`instructrl serve reward|reference` subprocess on a fixed port."""

    def __init__(self, role: str, port: int, overrides: list[str], log_path):
        self.address = f"127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "instructrl.cli", "serve", role, f"server.port={port}", "server.metrics_port=-1",
             *overrides], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

        async def healthy():
            ch = aio_channel(ClientConfig(address=self.address))
            try:
                await wait_healthy(ch, timeout_s=120)
            finally:
                await ch.close()
        asyncio.run(healthy())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def services(rollout_server_factory, tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("worker-services")
    rollout = rollout_server_factory(tiny_model_dir)
    reference = Service("reference", free_port(), [f"model={tiny_model_dir}"], d / "reference.log")
    yield rollout, reference, d
    reference.stop()


def _reward_args(model_dir) -> list[str]:
    return ["rule=instructrl.reward.rules:exact_match", f"tokenizer={model_dir}"]


def _queue_prompts(cfg: BufferConfig, tokenizer_dir) -> list[experience_pb2.PromptRecord]:
    recs = [experience_pb2.PromptRecord(prompt_id=f"q{i}", metadata={"answer": "x"},
                                        prompt=sequence(f"reverse: {i} a b" if i % 2 else [1, 10 + i, 20 + i]))
            for i in range(PROMPTS)]
    with PromptQueue.open(cfg) as q:
        assert q.put_prompts(recs, epoch=3) == PROMPTS
        Pacing(q.r, cfg.run_id).publish(0, None, 64, 0)  # as a learner with no staleness limit would
    return recs


def _worker_cfg(buffer: BufferConfig, rollout: str, reward: str, reference: str,
                temperature: float = 1.0) -> WorkerConfig:
    return WorkerConfig(replica_id="worker-test", rollout=ClientConfig(address=rollout),
                        reward=ClientConfig(address=reward, timeout_s=10),
                        reference=ClientConfig(address=reference, timeout_s=10),
                        buffer=buffer, sampling=Sampling(n=N, temperature=temperature, max_tokens=8),
                        claim_batch=4, retry=RetryConfig(base_s=0.1, cap_s=0.5), metrics_port=-1)


def _drain(buffer: BufferConfig, expect: int, timeout_s: float) -> list[experience_pb2.Experience]:
    out = []
    deadline = time.monotonic() + timeout_s
    with ExperienceBuffer.open(buffer) as exp:
        while len(out) < expect and time.monotonic() < deadline:
            batch = exp.get(64, "learner-test", block_ms=200)
            out += batch.records
            if len(batch):
                exp.ack(batch)
    return out


def _claimed_by_the_worker(cfg: BufferConfig, want: int, timeout_s: float) -> dict[str, int]:
    """Prompts pending in the rollout group per consumer (XPENDING), once `want` are claimed
    or after `timeout_s`."""
    with PromptQueue.open(cfg) as q:
        deadline = time.monotonic() + timeout_s
        while True:
            info = q.r.xpending(Keys.for_run(cfg.run_id).prompts, cfg.prompt_group)
            if info["pending"] >= want or time.monotonic() > deadline:
                return {c["name"].decode(): c["pending"] for c in info["consumers"]}
            time.sleep(0.1)


async def _run_worker(cfg: WorkerConfig, until) -> None:
    worker = RolloutWorker(cfg)
    task = asyncio.ensure_future(worker.run())
    try:
        await until()
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 60)


@pytest.mark.slow
def test_worker_writes_complete_experience_and_survives_a_down_reward_service(services, tiny_model_dir,
                                                                             redis_url, run_id, tmp_path):
    rollout, reference, logs = services
    buffer = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=200)
    _queue_prompts(buffer, tiny_model_dir)
    reward_port = free_port()
    tau = 0.7  # one temperature, carried in the data: sampler, record and reference agree on it
    cfg = _worker_cfg(buffer, rollout.address, f"127.0.0.1:{reward_port}", reference.address, temperature=tau)
    cfg.retry.attempts = 0  # wait for the reward service however long it takes to start
    box: dict = {}

    async def scenario():
        await asyncio.sleep(4.0)  # the worker claims and generates, and retries Score meanwhile
        box["claimed_while_down"] = await asyncio.to_thread(_claimed_by_the_worker, buffer, PROMPTS, 60)
        box["records_while_down"] = len(await asyncio.to_thread(_drain, buffer, 1, 0.5))
        with PromptQueue.open(buffer) as q:
            box["unacked_while_down"] = q.depth()
        box["reward"] = await asyncio.to_thread(
            Service, "reward", reward_port, _reward_args(tiny_model_dir), logs / "reward.log")
        box["records"] = await asyncio.to_thread(_drain, buffer, PROMPTS * N, 90)
        for _ in range(50):
            with PromptQueue.open(buffer) as q:
                if q.depth() == 0:
                    break
            await asyncio.sleep(0.1)

    try:
        asyncio.run(_run_worker(cfg, scenario))
    finally:
        if "reward" in box:
            box["reward"].stop()
    # while the reward service is down, the worker holds every prompt (pending in the rollout
    # group, under its name), has written nothing and acked nothing
    assert box["claimed_while_down"] == {"worker-test": PROMPTS}
    assert box["records_while_down"] == 0 and box["unacked_while_down"] == PROMPTS
    records = box["records"]
    assert len(records) == PROMPTS * N
    assert sorted(r.sample_id for r in records) == sorted(
        sample_id_for(f"q{i}", 3, j) for i in range(PROMPTS) for j in range(N))
    with PromptQueue.open(buffer) as q:
        assert q.depth() == 0  # every prompt acked

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for r in records:
        prompt, resp = decode(r.prompt_token_ids).tolist(), decode(r.response_token_ids).tolist()
        sampling, ref = decode(r.sampling_logprobs), decode(r.ref_logprobs)
        assert r.policy_version == 0 and r.replica_id == "worker-test" and r.run_id == run_id
        assert r.temperature == pytest.approx(tau)
        assert len(resp) == len(sampling) == len(ref) >= 1 and r.finish_reason in ("stop", "length")
        assert r.score in (0.0, 1.0) and r.timings.generate_s > 0
        with torch.no_grad():  # the reference log-probs are the SFT model's at tau, as the sampling ones
            logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1:-1] / tau
        want = torch.log_softmax(logits, -1)[torch.arange(len(resp)), torch.tensor(resp)]
        assert torch.allclose(ref, want, atol=1e-3) and torch.allclose(sampling, want, atol=1e-3)
    ids = {r.prompt_id: decode(r.prompt_token_ids).tolist() for r in records}
    assert ids["q0"] == [1, 10, 20]


@pytest.mark.slow
def test_worker_starts_no_more_samples_than_pacing_admits(services, tiny_model_dir, redis_url, run_id):
    """The learner's pacing rule (published by the test, as the learner does): with B = 4 and
    max_policy_lag 1, at most (1 + 1) * 4 samples are outstanding; the rest of the prompts stay
    unclaimed until records are trained; weights too far behind the learner get nothing."""
    from instructrl.rollout import metrics as m

    rollout, reference, logs = services
    buffer = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=200)
    _queue_prompts(buffer, tiny_model_dir)  # 6 prompts x N = 2 samples
    reward = Service("reward", free_port(), _reward_args(tiny_model_dir), logs / "reward-pacing.log")
    cfg = _worker_cfg(buffer, rollout.address, reward.address, reference.address)
    cfg.claim_batch = 1
    exp = ExperienceBuffer.open(buffer)
    pacing = Pacing(exp.r, run_id)
    pacing.publish(0, 1, 4, 0)
    box: dict = {}

    def settled(want: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while exp.depth() < want and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # had it been free to, the worker would have written more by now
        return exp.depth()

    async def scenario():
        box["first"] = await asyncio.to_thread(settled, 8)
        with PromptQueue.open(buffer) as q:
            box["prompts_left"] = q.depth()  # neither claimed nor acked
        got = exp.get(4, "learner-test", learner_version=0, block_ms=0)  # the learner trains 4 and acks them
        exp.ack(got)
        box["after_ack"] = await asyncio.to_thread(settled, 12)
        stale = m.ADMISSION_WAIT.labels("worker-test", "stale")._value.get()
        pacing.publish(5, 1, 4, 0)  # the learner moved on: weights at v0 are 5 versions behind
        await asyncio.sleep(3.0)
        box["stale_wait"] = m.ADMISSION_WAIT.labels("worker-test", "stale")._value.get() - stale

    try:
        asyncio.run(_run_worker(cfg, scenario))
    finally:
        reward.stop()
        exp.close()
    assert box["first"] == 8 and box["prompts_left"] == 2  # 2 prompts were left alone
    assert box["after_ack"] == 8  # 4 trained and acked: room for 4 more samples, the last 2 prompts
    assert box["stale_wait"] > 0.5
    with PromptQueue.open(buffer) as q:
        assert q.depth() == 0


@pytest.mark.slow
def test_a_poison_prompt_is_dead_lettered_and_the_others_are_written(services, tiny_model_dir, redis_url, run_id):
    """A real reward service whose rule crashes on one prompt (INTERNAL): the worker writes the
    other prompts' experience, gives the poison prompt back, and after `max_deliveries`
    deliveries it lands in the dead-letter stream with the error. The worker keeps running."""
    rollout, reference, _ = services
    buffer = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=200, claim_idle_ms=1000,
                          max_deliveries=2)
    prompts = [experience_pb2.PromptRecord(prompt_id=f"p{i}", prompt=sequence("poison 1 2" if i == 2 else f"sort {i}"))
               for i in range(4)]
    with PromptQueue.open(buffer) as q:
        q.put_prompts(prompts, epoch=0)
        Pacing(q.r, run_id).publish(0, None, 64, 0)
    box: dict = {"records": []}

    async def main():
        reward = await reward_server(RewardConfig(rule="poison_rule:poison", tokenizer=str(tiny_model_dir),
                                                  server=ServerConfig(port=0, metrics_port=-1))).start()
        cfg = _worker_cfg(buffer, rollout.address, f"127.0.0.1:{reward.port}", reference.address)

        async def until():
            deadline = time.monotonic() + 120
            with ExperienceBuffer.open(buffer) as exp:
                while time.monotonic() < deadline:
                    box["records"] += await asyncio.to_thread(_drain, buffer, 1, 0.5)
                    box["dead"] = read_dead_letters(exp.r, run_id)
                    if box["dead"] and len(box["records"]) >= 3 * N:
                        break
        try:
            await _run_worker(cfg, until)
        finally:
            await reward.stop(0)
    asyncio.run(main())
    assert sorted(r.sample_id for r in box["records"]) == sorted(
        sample_id_for(f"p{i}", 0, j) for i in (0, 1, 3) for j in range(N))
    (dead,) = box["dead"]
    assert dead["reason"] == "failed" and "INTERNAL" in dead["detail"] and "crashed" in dead["detail"]
    assert experience_pb2.PromptRecord.FromString(dead["r"]).prompt_id == "p2"
    with PromptQueue.open(buffer) as q:
        assert q.depth() == 0  # nothing left pending: written and acked, or dead-lettered
