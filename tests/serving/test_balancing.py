"""Reward and reference clients spread calls over every replica (issue 13 bug 7, Python side).

A headless Service's DNS name resolves to every ready pod; with gRPC's default pick_first one
pod got all the calls. The clients use round_robin, and the servers close connections after
`server.max_connection_age_s` so that the name is resolved again and new pods get load.
One name cannot resolve to two local ports, so the real test uses an `ipv4:` target listing
two reward servers, which gRPC balances the same way as a DNS name with two addresses.
"""
from __future__ import annotations

import asyncio
import collections
import json

from instructrl.reference import client as reference_client
from instructrl.reference.config import ReferenceConfig
from instructrl.reward import client as reward_client
from instructrl.reward.client import RewardClient, score_request
from instructrl.reward.config import RewardConfig
from instructrl.reward.server import reward_server
from instructrl.serving.client import ClientConfig, channel_options
from instructrl.serving.server import ServerConfig

RULE = "instructrl.reward.rules:exact_match"


def test_reward_and_reference_channels_are_round_robin(monkeypatch):
    opts = dict(channel_options(ClientConfig(), 64, balanced=True))
    assert json.loads(opts["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert "grpc.service_config" not in dict(channel_options(ClientConfig(), 64))  # others: one server
    seen = []
    for module in (reward_client, reference_client):
        def record(cfg, *a, real=module.aio_channel, **kw):
            seen.append(kw)
            return real(cfg, *a, **kw)
        monkeypatch.setattr(module, "aio_channel", record)

    async def make():
        for client in (reward_client.RewardClient(ClientConfig()), reference_client.ReferenceClient(ClientConfig())):
            await client.close()
    asyncio.run(make())
    assert seen == [{"balanced": True}, {"balanced": True}]
    assert RewardConfig(rule=RULE).server.max_connection_age_s > 0
    assert ReferenceConfig(model="x").server.max_connection_age_s > 0


def test_two_reward_servers_behind_one_target_both_get_calls():
    async def main():
        servers = [await reward_server(RewardConfig(rule=RULE, name=name, server=ServerConfig(
            port=0, metrics_port=-1, max_connection_age_s=1.0))).start() for name in ("a", "b")]
        target = "ipv4:" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
        served = collections.Counter()
        try:
            async with RewardClient(ClientConfig(address=target)) as client:
                request = score_request([("q", "x", {"answer": "x"})])
                for _ in range(20):
                    served[(await client.stub.Score(request, timeout=10)).model] += 1
                await asyncio.sleep(1.5)  # past max_connection_age: GOAWAY, the calls go on
                for _ in range(10):
                    served[(await client.stub.Score(request, timeout=10)).model] += 1
        finally:
            for s in servers:
                await s.stop(0)
        return served
    served = asyncio.run(main())
    print("calls per server:", dict(served))
    assert set(served) == {"a", "b"} and sum(served.values()) == 30
    assert min(served.values()) >= 10  # round robin: an even share, not one server
