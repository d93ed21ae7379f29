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
import torch

from instructrl.buffer import BufferConfig, ExperienceBuffer, PromptQueue, RedisConfig, sample_id_for
from instructrl.codec import decode
from instructrl.rollout.worker import RetryConfig, RolloutWorker, SamplingConfig, Stopped, WorkerConfig, retry
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.v1 import common_pb2, experience_pb2
from redis_server import free_port

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
                                        prompt=common_pb2.Sequence(text=f"reverse: {i} a b") if i % 2 else
                                        common_pb2.Sequence(token_ids=common_pb2.TokenIds(ids=[1, 10 + i, 20 + i])))
            for i in range(PROMPTS)]
    with PromptQueue.open(cfg) as q:
        assert q.put_prompts(recs, epoch=3) == PROMPTS
    return recs


def _worker_cfg(buffer: BufferConfig, rollout: str, reward: str, reference: str) -> WorkerConfig:
    return WorkerConfig(replica_id="worker-test", rollout=ClientConfig(address=rollout),
                        reward=ClientConfig(address=reward, timeout_s=10),
                        reference=ClientConfig(address=reference, timeout_s=10),
                        buffer=buffer, sampling=SamplingConfig(n=N, temperature=1.0, max_tokens=8),
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
    recs = _queue_prompts(buffer, tiny_model_dir)
    reward_port = free_port()
    cfg = _worker_cfg(buffer, rollout.address, f"127.0.0.1:{reward_port}", reference.address)
    box: dict = {}

    async def scenario():
        await asyncio.sleep(4.0)  # the worker claims and generates, and retries Score meanwhile
        box["records_while_down"] = len(await asyncio.to_thread(_drain, buffer, 1, 0.5))
        with PromptQueue.open(buffer) as q:
            box["pending_while_down"] = q.depth()
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
    assert box["records_while_down"] == 0 and box["pending_while_down"] == PROMPTS  # nothing lost, nothing acked
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
        assert len(resp) == len(sampling) == len(ref) >= 1 and r.finish_reason in ("stop", "length")
        assert r.score in (0.0, 1.0) and r.timings.generate_s > 0
        with torch.no_grad():  # the reference log-probs are the SFT model's, the sampling ones match too at T=1
            logits = model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1:-1]
        want = torch.log_softmax(logits, -1)[torch.arange(len(resp)), torch.tensor(resp)]
        assert torch.allclose(ref, want, atol=1e-3) and torch.allclose(sampling, want, atol=1e-3)
    ids = {r.prompt_id: decode(r.prompt_token_ids).tolist() for r in records}
    assert ids["q0"] == [1, 10, 20]
