"""One sampling temperature, carried in the data (issue 14 item 1; CONVENTIONS 12).

The record carries the temperature tau it was sampled at; the reference scores at it (the
`LogProbs` request carries it) and the learner's actor divides its logits by it. With the
actor equal to the SFT model the per-token KL to the reference must then be 0 at any tau;
when the reference always scored at 1 it read 0.05-0.25 nats per response at tau = 0.7.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from learner_testkit import build_tiny, experience, random_prompts, sample

from instructrl.buffer import BufferConfig, ExperienceBuffer, RedisConfig, read_dead_letters
from instructrl.learner.batch import from_records
from instructrl.learner.models import load_actor, policy_forward
from instructrl.reference.client import ReferenceClient
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.server import reference_server
from instructrl.rl import kl_estimate
from instructrl.serving.client import ClientConfig
from instructrl.serving.server import ServerConfig

TAU = 0.7
B, P, T = 6, 4, 12


async def _reference_logprobs(model_dir: str, seqs: list[list[int]], temperature: float) -> list[list[float]]:
    srv = await reference_server(ReferenceConfig(model=model_dir, server=ServerConfig(port=0, metrics_port=-1))
                                 ).start()
    try:
        async with ReferenceClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as ref:
            out = await ref.logprobs(seqs, [P] * len(seqs), temperature=temperature)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # a temperature the scorer cannot use
                await ref.logprobs(seqs[:1], [P], temperature=-1.0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return [x.tolist() for x in out]
    finally:
        await srv.stop(0)


def test_kl_is_zero_when_the_actor_is_the_sft_model(tmp_path):
    model_dir = build_tiny(tmp_path / "sft")
    actor = load_actor(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = random_prompts(B, P, 300, gen)
    responses, sampled = sample(actor, prompts, T, gen, temperature=TAU)  # the rollout, at tau
    ref = asyncio.run(_reference_logprobs(model_dir, [p + r for p, r in zip(prompts, responses, strict=True)], TAU))
    records = [experience(f"p{i}/e0/s0", prompts[i], responses[i], sampled[i], ref[i], 0.0, 0)
               for i in range(B)]
    for rec in records:
        rec.temperature = TAU  # what the worker writes (its sampling.temperature)
    batch = from_records(records, [0] * B, pad_id=0)
    with torch.no_grad():
        actor_lp, _ = policy_forward(actor, batch)  # the learner, at the record's temperature
    kl = kl_estimate(actor_lp, batch.ref_logprobs, batch.response_mask, "k1")  # (B, T)
    per_response = kl.sum(-1)
    print(f"KL(actor || SFT) at tau={TAU}: max |per token| {kl.abs().max().item():.2e}, "
          f"per response {per_response.tolist()}")
    assert kl.abs().max().item() < 1e-6
    torch.testing.assert_close(actor_lp, torch.tensor(sampled), atol=1e-5, rtol=1e-5)  # and the sampler's


def test_learner_refuses_records_of_another_temperature(redis_url, run_id):
    """ppo.temperature > 0 dead-letters records sampled at another (reason temperature); 0 takes all."""
    cfg = BufferConfig(redis=RedisConfig(url=redis_url), run_id=run_id, block_ms=0)
    recs = [experience(f"p{i}/e0/s0", [5, 6], [7, 8], [-1.0, -1.0], [-1.0, -1.0], 0.0, 0) for i in range(3)]
    recs[0].temperature, recs[1].temperature = TAU, 1.0  # recs[2]: unset, read as 1
    with ExperienceBuffer.open(cfg) as buf:
        buf.put(recs, validate=True)
        got = buf.get(10, "learner", temperature=TAU)
        assert got.sample_ids == ["p0/e0/s0"] and got.wrong_temperature == 2
        dead = read_dead_letters(buf.r, run_id)
        assert [d["reason"] for d in dead] == ["temperature"] * 2
        assert "sampled at temperature 1" in dead[0]["detail"]
        buf.put([experience("q/e0/s0", [5], [7], [-1.0], [-1.0], 0.0, 0)])
        assert buf.get(10, "learner", temperature=0.0).sample_ids == ["q/e0/s0"]  # 0: the records' own


def test_records_with_a_bad_temperature_are_poison():
    from instructrl.buffer.validate import PoisonRecord, check_experience

    rec = experience("p/e0/s0", [5], [7], [-1.0], [-1.0], 0.0, 0)
    for bad in (float("nan"), float("inf"), -0.5):
        rec.temperature = bad
        with pytest.raises(PoisonRecord, match="temperature"):
            check_experience(rec.SerializeToString())
