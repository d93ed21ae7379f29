"""Fuzz every RPC of every real service (issue 14): each answer is a status other than
UNKNOWN/INTERNAL, the service stays SERVING, and a rejected request changes no state.

RPCs are found through server reflection (tests/serving/fuzz.py), so a new RPC is fuzzed
without an edit here. Per method: the empty message, `CALLS` random and boundary messages
(fixed seed), `CALLS` mutations of a valid request where SEEDS has one (one field set to a
boundary value, so the checks past the first field are reached too) and undecodable bytes.
The reward, reference and learner services run in this process over real sockets; the
rollout service is vLLM with a tiny model in a subprocess (slow test). The counts (calls per
method, codes) are printed: `pytest -s`.

No service writes to the experience buffer (only the rollout worker does), so "nothing
written from a rejected request" is checked on the state a service does keep: the learner's
registered replicas and queued checkpoint requests.
"""
from __future__ import annotations

import asyncio
import collections
import random

import grpc
import pytest
from fuzz import GARBAGE, Method, messages, methods, mutate
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructrl.codec import sequence, tokens
from instructrl.learner.control import Control
from instructrl.learner.server import ServerThread
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.server import reference_server
from instructrl.reward.config import RewardConfig
from instructrl.reward.server import reward_server
from instructrl.serving.server import ServerConfig
from instructrl.v1 import learner_pb2, reference_pb2, reward_pb2, rollout_pb2

CALLS = 40  # random messages per method
SEED = 14
FAILURES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
Counts = dict[str, collections.Counter]
SEEDS = {  # a valid request per method, where one is easy to write
    "/instructrl.v1.RewardService/Score": reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
        prompt=sequence([5, 6, 7]), response=sequence([8, 9]))]),
    "/instructrl.v1.ReferenceService/LogProbs": reference_pb2.LogProbsRequest(items=[
        reference_pb2.LogProbsItem(token_ids=tokens([5, 6, 7, 8]), response_start=2)], temperature=0.7),
    "/instructrl.v1.RolloutService/Generate": rollout_pb2.GenerateRequest(
        prompts=[sequence([5, 6, 7])], params=rollout_pb2.SamplingParams(n=2, temperature=0.7, max_tokens=4)),
    "/instructrl.v1.RolloutService/GenerateStream": rollout_pb2.GenerateRequest(
        prompts=[sequence([5, 6, 7])], params=rollout_pb2.SamplingParams(n=1, temperature=1.0, max_tokens=4)),
    "/instructrl.v1.LearnerService/RegisterRollout": learner_pb2.RegisterRolloutRequest(
        replica_id="r", address="127.0.0.1:50061", policy_version=0),
    "/instructrl.v1.LearnerService/SaveCheckpoint": learner_pb2.SaveCheckpointRequest(path="manual"),
}


async def _call(ch: grpc.aio.Channel, m: Method, request, timeout: float) -> tuple[grpc.StatusCode, object]:
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        if m.server_streaming:
            items = [x async for x in ch.unary_stream(m.path)(raw, timeout=timeout)]
            return grpc.StatusCode.OK, items
        return grpc.StatusCode.OK, await ch.unary_unary(m.path)(raw, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()


async def fuzz(address: str, timeout: float = 10.0, on_answer=None) -> tuple[Counts, list[str]]:
    """Fuzz every RPC at `address`; returns (codes per method, failures)."""
    found = await asyncio.to_thread(methods, address)
    assert found, f"no RPC found by reflection at {address}"
    rng = random.Random(SEED)
    counts: Counts = {}
    failures: list[str] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        for m in found:
            c = counts.setdefault(m.path, collections.Counter())
            mutants = [mutate(SEEDS[m.path], rng) for _ in range(CALLS)] if m.path in SEEDS else []
            for request in [*messages(m.request, rng, CALLS), *mutants, *GARBAGE]:
                code, answer = await _call(ch, m, request, timeout)
                c[code.name] += 1
                if code in FAILURES:
                    failures.append(f"{m.path} -> {code.name}: {str(answer)[:200]} for {str(request)[:300]!r}")
                if on_answer is not None:
                    on_answer(m, request, code)
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, f"{address} is no longer SERVING"
    return counts, failures


def report(name: str, counts: Counts, failures: list[str]) -> None:
    print(f"\nfuzz {name}: {sum(sum(c.values()) for c in counts.values())} calls")
    for path, c in counts.items():
        print(f"  {path}: {sum(c.values())} calls, " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for f in failures[:20]:
        print("  FAILURE", f)
    assert not failures, f"{len(failures)} answers were UNKNOWN/INTERNAL (first: {failures[0]})"


def _cfg() -> ServerConfig:
    return ServerConfig(port=0, metrics_port=-1)


@pytest.mark.parametrize("role", ["reward", "reference"])
def test_fuzz_scoring_services(role, reward_model_dir, sft_model_dir):
    async def main():
        srv = (reward_server(RewardConfig(model=str(reward_model_dir), server=_cfg())) if role == "reward" else
               reference_server(ReferenceConfig(model=str(sft_model_dir), server=_cfg())))
        await srv.start()
        try:
            return await fuzz(f"127.0.0.1:{srv.port}")
        finally:
            await srv.stop(0)
    report(role, *asyncio.run(main()))


def test_fuzz_learner_service(tmp_path):
    control = Control(str(tmp_path / "ckpt"), ["peer"])
    control.ready.set()
    server = ServerThread(_cfg(), control).start()
    registered = set()

    def on_answer(m: Method, request, code: grpc.StatusCode) -> None:
        if m.path.endswith("/RegisterRollout") and code == grpc.StatusCode.OK:
            registered.add(request.replica_id)
        if m.path.endswith("/UnregisterRollout") and code == grpc.StatusCode.OK:
            registered.discard(request.replica_id)
    try:
        counts, failures = asyncio.run(fuzz(f"127.0.0.1:{server.port}", timeout=2.0, on_answer=on_answer))
    finally:
        server.stop(0)
    report("learner", counts, failures)
    assert set(control.replicas()) == registered  # a refused registration registered nothing
    while (save := control.take_save_request()) is not None:  # a refused SaveCheckpoint queued nothing
        assert save[0] == "" or save[0].startswith(str(tmp_path / "ckpt") + "/")


@pytest.mark.slow
def test_fuzz_rollout_service(tmp_path):
    from rollout_process import RolloutProcess

    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    model = tmp_path / "tiny"
    build_tiny_llama(model, TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, vocab_size=300, seed=0))
    proc = RolloutProcess(model, tmp_path / "rollout.log", ["limits.max_prompts=8", "limits.max_n=4"])
    try:
        counts, failures = asyncio.run(fuzz(proc.address, timeout=20.0))
    finally:
        proc.stop()
    report("rollout", counts, failures)
