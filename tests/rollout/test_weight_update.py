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

from instructrl.codec import token_array
from instructrl.rollout.client import RolloutClient
from instructrl.rollout.domain import Sampling
from instructrl.serving.client import ClientConfig, sync_channel
from instructrl.v1 import rollout_pb2, rollout_pb2_grpc
from instructrl.weight_sync import WeightSyncCoordinator
from instructrl.weight_sync import group as wg
from instructrl.weight_sync.transport import WeightSender

pytestmark = pytest.mark.slow

PROMPTS = [[1, 17, 42, 99, 7], [1, 200, 201], [1, 5, 6, 7, 8, 9, 10, 11]]
MAX_NEW = 16


@pytest.fixture(scope="module")
def server(rollout_server_factory, tiny_model_dir):
    return rollout_server_factory(tiny_model_dir, "limits.max_in_flight=64")


def _greedy(address: str) -> tuple[list[list[int]], int]:
    async def run():
        async with RolloutClient(ClientConfig(address=address)) as c:
            r = await c.generate(PROMPTS, Sampling(temperature=0.0, max_tokens=MAX_NEW), timeout_s=60)
            return [token_array(p.completions[0].token_ids).tolist() for p in r.results], r.policy_version
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


def test_update_then_greedy_matches_transformers(server, tiny_model_dir):
    before, v0 = _greedy(server.address)
    assert v0 == 0
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=60, bucket_mb=1)
    try:
        coord.set_replicas([server.address])
        for version, seed in ((1, 1), (2, 2)):  # the second sync reuses the group
            model = _perturbed(tiny_model_dir, seed)
            res = coord.sync(model.named_parameters, version)
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


def test_stalled_broadcast_times_out_keeps_old_weights_then_rejoins(server, tiny_model_dir):
    # An established group (the replica keeps its receive buffers between updates)...
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=60, bucket_mb=1)
    coord.set_replicas([server.address])
    v0 = _status(server.address).policy_version + 1
    model = _perturbed(tiny_model_dir, 4)
    assert coord.sync(lambda: model.named_parameters(), v0).replicas_ok == [server.address]
    before, _ = _greedy(server.address)
    assert before == _hf_greedy(model, eos=model.config.eos_token_id)
    # ...then the learner sends the next update's control RPC, one bucket of zeros (it lands in
    # the buffer that held the live update's first bucket: the weights must not alias it), and hangs.
    manifest, group_id = coord._manifest, coord._group_id
    assert len(manifest.buckets) >= 2
    with sync_channel(ClientConfig(address=server.address)) as ch:
        upd = rollout_pb2_grpc.RolloutServiceStub(ch).UpdateWeights.future(rollout_pb2.UpdateWeightsRequest(
            policy_version=99, manifest=manifest, group_id=group_id, timeout_s=3.0), timeout=30)
        t0 = time.monotonic()
        wg.broadcast(coord._sender.pg, torch.zeros(manifest.buckets[0].nbytes, dtype=torch.uint8), 10).wait()
        with pytest.raises(grpc.RpcError) as e:
            upd.result()
        waited = time.monotonic() - t0
    coord.close()  # the stalled learner goes away
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert 2.5 < waited < 15, waited
    st = _status(server.address)
    assert st.policy_version == v0 and st.accepting and st.group_id == ""
    after, v = _greedy(server.address)  # still serving, with the old weights intact
    assert v == v0 and after == before
    # A new group (the restarted learner's) and the next update goes through.
    coord = WeightSyncCoordinator("127.0.0.1", 0, "gloo", timeout_s=60, bucket_mb=1)
    try:
        coord.set_replicas([server.address])
        model = _perturbed(tiny_model_dir, 5)
        res = coord.sync(lambda: model.named_parameters(), v0 + 1)
        assert res.replicas_ok == [server.address], res
        got, v = _greedy(server.address)
        assert v == v0 + 1 and got == _hf_greedy(model, eos=model.config.eos_token_id)
    finally:
        coord.close()
    text = __import__("urllib.request").request.urlopen(
        f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    assert f'instructrl_rollout_policy_version{{replica="test-replica"}} {v0 + 1}.0' in text
    assert 'instructrl_rollout_weight_update_failures_total{replica="test-replica"} 1.0' in text


def test_a_newer_join_supersedes_one_still_waiting_for_its_peers(server):
    # The learner rebuilds its group without a peer that went away while this replica was still
    # waiting for that peer in the old group's rendezvous: the new group must form now, not after
    # the old join's timeout (issue 13, scenario 3: a cut link cost the healthy replicas 20 s).
    store = wg.host_store("127.0.0.1", 0, 30)
    init = f"tcp://127.0.0.1:{store.port}"
    with sync_channel(ClientConfig(address=server.address)) as ch:
        stub = rollout_pb2_grpc.RolloutServiceStub(ch)
        old = stub.JoinWeightGroup.future(rollout_pb2.JoinWeightGroupRequest(
            init_method=init, rank=1, world_size=3, backend="gloo", timeout_s=12, group_id="old"), timeout=30)
        time.sleep(1.0)  # its rendezvous waits for ranks 0 and 2, which never come
        t0 = time.monotonic()
        new = stub.JoinWeightGroup.future(rollout_pb2.JoinWeightGroupRequest(
            init_method=init, rank=1, world_size=2, backend="gloo", timeout_s=20, group_id="new"), timeout=30)
        sender = WeightSender(init, 2, "gloo", 30, group_id="new", store=store)
        new.result()
        joined_s = time.monotonic() - t0
        with pytest.raises(grpc.RpcError) as e:
            old.result()
    try:
        assert joined_s < 5, f"the new group formed {joined_s:.1f}s later: it waited for the old join"
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
        assert _status(server.address).group_id == "new"
    finally:
        sender.close()
