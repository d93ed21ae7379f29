"""Live weight updates into a rollout server subprocess, driven from this (learner) process.

The proof: after `WeightSyncCoordinator.sync`, greedy generation over gRPC equals a
transformers model holding the same weights, token for token. And a broadcast that
stalls times out on the replica, which keeps its old weights and version, goes on
serving, and joins a new group for the next update.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from instructrl.rollout.client import RolloutClient, sampling_params
from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import rollout_pb2, rollout_pb2_grpc
from instructrl.weight_sync import WeightSender, WeightSyncCoordinator, param_meta, plan_buckets
from instructrl.weight_sync import group as wg

pytestmark = pytest.mark.slow

PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 201], [1, 5, 6, 7, 8, 9, 10, 11]]
MAX_NEW = 16


@pytest.fixture(scope="module")
def server(rollout_server_factory, tiny_model_dir):
    return rollout_server_factory(tiny_model_dir, "limits.max_in_flight=64")


def _greedy(address: str) -> tuple[list[list[int]], int]:
    async def run():
        async with RolloutClient(ClientConfig(address=address)) as c:
            r = await c.generate(PROMPTS, sampling_params(temperature=0.0, max_tokens=MAX_NEW), timeout_s=60)
            return [list(p.completions[0].token_ids) for p in r.results], r.policy_version
    return asyncio.run(run())


def _status(address: str) -> rollout_pb2.RolloutStatus:
    with sync_channel(ClientConfig(address=address)) as ch:
        return rollout_pb2_grpc.RolloutServiceStub(ch).GetStatus(rollout_pb2.GetRolloutStatusRequest(), timeout=10)


def _hf_greedy(model, eos: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            new = ids[0, len(p):].tolist()
            out.append(new[:new.index(eos) + 1] if eos in new else new)
    return out


def _perturbed(model_dir, seed: int):
    """The tiny policy with every weight moved, and a sharper head so argmax margins are wide."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.lm_head.weight.mul_(40.0)
    return model


def test_stalled_broadcast_times_out_and_keeps_old_weights(server, tiny_model_dir):
    before, v0 = _greedy(server.address)
    assert v0 == 0
    # A manifest shaped like the real model, in small buckets so the stall lands mid-update.
    manifest = plan_buckets(param_meta(_perturbed(tiny_model_dir, 0).named_parameters()), 256 * 1024)
    assert len(manifest.buckets) > 3
    store = wg.host_store("127.0.0.1", 0, 30)
    init = f"tcp://127.0.0.1:{store.port}"
    with sync_channel(ClientConfig(address=server.address)) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        join = stub.JoinWeightGroup.future(rollout_pb2.JoinWeightGroupRequest(
            init_method=init, rank=1, world_size=2, backend="gloo", timeout_s=30, group_id="stall-1"), timeout=40)
        sender = WeightSender(init, 2, "gloo", 30, group_id="stall-1", store=store)
        join.result()
        assert _status(server.address).group_id == "stall-1"
        t0 = time.monotonic()
        upd = stub.UpdateWeights.future(rollout_pb2.UpdateWeightsRequest(
            policy_version=99, manifest=manifest, group_id="stall-1", timeout_s=3.0), timeout=30)
        first = torch.zeros(manifest.buckets[0].nbytes, dtype=torch.uint8)
        wg.broadcast(sender.pg, first, 10).wait()  # one bucket, then the learner "hangs"
        with pytest.raises(grpc.RpcError) as e:
            upd.result()
        waited = time.monotonic() - t0
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
        assert 2.5 < waited < 15, waited
        sender.close()
    st = _status(server.address)
    assert st.policy_version == 0 and st.accepting and st.group_id == ""
    after, v = _greedy(server.address)  # still serving, with the old weights
    assert v == 0 and after == before


def test_update_then_greedy_matches_transformers(server, tiny_model_dir):
    before, _ = _greedy(server.address)
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=60, bucket_mb=1)
    try:
        coord.set_replicas([server.address])
        for version, seed in ((1, 1), (2, 2)):  # the second sync reuses the group
            model = _perturbed(tiny_model_dir, seed)
            res = coord.sync(lambda: model.named_parameters(), version)
            assert res.replicas_ok == [server.address] and res.replicas_failed == [], res
            assert res.bytes >= sum(p.numel() * 4 for p in model.parameters())
            got, v = _greedy(server.address)
            assert v == version and _status(server.address).policy_version == version
            want = _hf_greedy(model, eos=model.config.eos_token_id)
            assert got == want
            assert got != before
            before = got
    finally:
        coord.close()
    text = __import__("urllib.request").request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert 'instructrl_rollout_policy_version{replica="test-replica"} 2.0' in text
    assert 'instructrl_rollout_weight_update_failures_total{replica="test-replica"} 1.0' in text
