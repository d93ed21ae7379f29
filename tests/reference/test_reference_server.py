"""Reference service over real sockets: errors, auth, the 32-client load test, the CLI entry point."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from instructrl.codec import logprob_array, logprobs, tokens
from instructrl.reference.client import ReferenceClient
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.scorer import LogProbsInput
from instructrl.reference.server import SERVICE_NAME, reference_server
from instructrl.serving.batcher import BatchingConfig
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.serving.server import ServerConfig
from instructrl.v1 import reference_pb2, reference_pb2_grpc

ATOL = 1e-5


@contextlib.asynccontextmanager
async def running(cfg: ReferenceConfig, scorer=None):
    srv = await reference_server(cfg, scorer).start()
    try:
        yield srv
    finally:
        await srv.stop(0)


def _cfg(model_dir, token: str = "", max_wait_ms: float = 5) -> ReferenceConfig:
    return ReferenceConfig(model=str(model_dir), server=ServerConfig(port=0, metrics_port=-1, token=token),
                           batching=BatchingConfig(max_wait_ms=max_wait_ms))


def _unbatched(scorer, xs):
    items, _ = scorer.prepare(xs)
    return [scorer.forward([it])[0] for it in items]


def _req(*items) -> reference_pb2.LogProbsRequest:
    return reference_pb2.LogProbsRequest(
        items=[reference_pb2.LogProbsItem(token_ids=tokens(ids), response_start=s) for ids, s in items])


def test_errors_keep_the_service_up_and_token_auth(sft_model_dir, reference_scorer):
    bad = {
        "empty request": _req(),
        "empty token_ids": _req(([1, 2], 1), ([], 0)),
        "no response": _req(([1, 2, 3], 3)),
        "no prompt": _req(([1, 2, 3], 0)),
        "out of vocabulary": _req(([1, 999, 3], 1)),
        "too long": _req(([5] * 200, 100)),
        "token ids not INT32": reference_pb2.LogProbsRequest(items=[reference_pb2.LogProbsItem(
            token_ids=logprobs([1.0, 2.0]), response_start=1)]),
    }
    want = _unbatched(reference_scorer, [LogProbsInput([4, 5, 6, 7], 2)])

    async def main():
        async with running(_cfg(sft_model_dir, token="tok"), reference_scorer) as srv:
            addr = f"127.0.0.1:{srv.port}"
            async with ReferenceClient(ClientConfig(address=addr)) as anon:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await anon.logprobs([[4, 5, 6, 7]], [2])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                h = await health_pb2_grpc.HealthStub(anon.channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                assert h.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(anon.channel)  # open without a token too
                resp = [r async for r in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
                assert SERVICE_NAME in {s.name for s in resp[0].list_services_response.service}
            async with ReferenceClient(ClientConfig(address=addr, token="tok")) as client:
                for name, req in bad.items():
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await client.stub.LogProbs(req, timeout=10)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                    assert "items" in e.value.details(), name
                got = await client.logprobs([[4, 5, 6, 7]], [2])  # still up
                assert len(got[0]) == 2 and got[0] == pytest.approx(want[0], abs=ATOL)
    asyncio.run(main())


def test_load_32_concurrent_clients_match_unbatched(sft_model_dir, reference_scorer):
    rng = random.Random(3)

    def request():
        xs = []
        for _ in range(rng.randint(1, 3)):
            p, r = rng.randint(1, 40), rng.randint(1, 30)
            xs.append(LogProbsInput([rng.randrange(0, 300) for _ in range(p + r)], p))
        return xs

    work = [[request() for _ in range(4)] for _ in range(32)]  # 128 requests
    want = [[_unbatched(reference_scorer, req) for req in client] for client in work]

    async def one_client(addr, reqs):
        async with ReferenceClient(ClientConfig(address=addr, timeout_s=60)) as c:
            return [await c.logprobs([x.token_ids for x in req], [x.response_start for x in req])
                    for req in reqs]

    async def main():
        async with running(_cfg(sft_model_dir, max_wait_ms=10), reference_scorer) as srv:
            before = REGISTRY.get_sample_value("instructrl_batch_size_count", {"service": "reference"}) or 0
            got = await asyncio.gather(*[one_client(f"127.0.0.1:{srv.port}", reqs) for reqs in work])
            after = REGISTRY.get_sample_value("instructrl_batch_size_count", {"service": "reference"})
            return got, after - before

    got, forwards = asyncio.run(main())
    for g_client, w_client in zip(got, want, strict=True):
        for g_req, w_req in zip(g_client, w_client, strict=True):
            assert len(g_req) == len(w_req)
            for g, w in zip(g_req, w_req, strict=True):
                torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=ATOL, rtol=0)
    assert forwards < 128 / 2, f"{forwards} forward passes for 128 requests: batching did not merge"


def test_cli_subprocess_serves_health_and_logprobs(sft_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", "serve", "reference",
                             f"model={sft_model_dir}", f"server.port={port}", "server.metrics_port=-1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        async def main():
            ch = aio_channel(ClientConfig(address=f"127.0.0.1:{port}"))
            await wait_healthy(ch, SERVICE_NAME, timeout_s=60)
            resp = await reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(_req(([1, 2, 3], 1)), timeout=30)
            await ch.close()
            return resp
        resp = asyncio.run(main())
        assert len(logprob_array(resp.results[0].logprobs)) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
