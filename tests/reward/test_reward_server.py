"""Reward service over real sockets: RPC semantics, errors, auth, normalisation, load, CLI."""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY

from instructrl.reward.client import RewardClient, score_request
from instructrl.reward.config import RewardConfig
from instructrl.reward.scorer import ScoreInput, score
from instructrl.reward.server import SERVICE_NAME, reward_server
from instructrl.serving.batcher import BatchingConfig
from instructrl.serving.client import ClientConfig, aio_channel, wait_healthy
from instructrl.serving.server import ServerConfig
from instructrl.v1 import common_pb2, reward_pb2, reward_pb2_grpc

ATOL = 1e-5


def _cfg(model_dir, **kw) -> RewardConfig:
    server = kw.pop("server", ServerConfig(port=0, metrics_port=-1))
    batching = kw.pop("batching", BatchingConfig(max_wait_ms=5))
    return RewardConfig(model=str(model_dir), server=server, batching=batching, **kw)


@contextlib.asynccontextmanager
async def running(cfg: RewardConfig, scorer=None):
    srv = await reward_server(cfg, scorer).start()
    try:
        yield srv
    finally:
        await srv.stop(0)


def _random_items(rng: random.Random, n: int) -> list[ScoreInput]:
    return [ScoreInput([rng.randrange(3, 300) for _ in range(rng.randint(1, 40))],
                       [rng.randrange(0, 300) for _ in range(rng.randint(1, 30))]) for _ in range(n)]


def _batches() -> float:
    return REGISTRY.get_sample_value("instructrl_batch_size_count", {"service": "reward"}) or 0.0


def test_score_errors_and_metrics(reward_model_dir, reward_scorer):
    items = [ScoreInput("sort: 3 1 2 =>", " 1 2 3"), ScoreInput([5, 6, 7], [8, 9])]
    want = score(reward_scorer, items, batched=False)

    def seq(**kw):
        return common_pb2.Sequence(**kw)

    ok_item = reward_pb2.ScoreItem(prompt=seq(text="a"), response=seq(text="b"))
    bad = {
        "empty request": reward_pb2.ScoreRequest(),
        "empty response": reward_pb2.ScoreRequest(items=[ok_item, reward_pb2.ScoreItem(
            prompt=seq(text="a"), response=seq(text=""))]),
        "unset response": reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=seq(text="a"))]),
        "out of vocabulary": score_request([([1, 2], [300])]),
        "negative id": score_request([([1, -5], [3])]),
        "too long": score_request([([4] * 120, [5] * 20)]),
        "token ids not INT32": reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
            prompt=seq(text="a"), response=seq(token_ids=common_pb2.Tensor(datatype="INT64", shape=[1],
                                                                          raw_data=b"\x01" + b"\x00" * 7)))]),
    }

    async def main():
        async with running(_cfg(reward_model_dir, server=ServerConfig(port=0, metrics_port=0)),
                           reward_scorer) as srv, \
                RewardClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as client:
            scores, raw = await client.score([(x.prompt, x.response) for x in items])
            assert scores == raw and raw == pytest.approx(want, abs=ATOL)
            stub = client.stub
            for name, req in bad.items():
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Score(req)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
                assert "items" in e.value.details(), name
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Score(score_request([([1, 2], [3])]), timeout=0.0005)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            resp = await stub.Score(score_request([(x.prompt, x.response) for x in items]))  # still up
            assert list(resp.raw_scores) == pytest.approx(want, abs=ATOL)
            assert resp.model == reward_model_dir.name and not resp.HasField("normalization")
            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.grpc.metrics_port}/metrics").read().decode()
        for needle in ('instructrl_grpc_requests_total{code="INVALID_ARGUMENT",method="Score",service="reward"}',
                       'instructrl_batch_size_bucket{le="1.0",service="reward"}',
                       'instructrl_batch_tokens_total{service="reward"}',
                       'instructrl_batch_wait_seconds_count{service="reward"}',
                       'instructrl_grpc_request_seconds_bucket'):
            assert needle in text, needle
    asyncio.run(main())


def test_normalisation_token_and_rule(reward_model_dir, reward_scorer):
    async def main():
        cfg = _cfg(reward_model_dir, server=ServerConfig(port=0, metrics_port=-1, token="s3cret"))
        cfg.normalization.enabled = True
        async with running(cfg, reward_scorer) as srv:
            addr = f"127.0.0.1:{srv.port}"
            async with RewardClient(ClientConfig(address=addr)) as anon:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await anon.score([("a", "b")])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with RewardClient(ClientConfig(address=addr, token="s3cret")) as client:
                s1, r1 = await client.score([("a", "b"), ("c", "d e f")])
                s2, r2 = await client.score([("g", "h")])
                resp = await client.stub.Score(score_request([("g", "h")]))
        seen = r1 + r2 + list(resp.raw_scores)
        mean = sum(seen) / 4
        std = (sum((x - mean) ** 2 for x in seen) / 3) ** 0.5
        assert resp.normalization.count == 4
        assert resp.normalization.mean == pytest.approx(mean, abs=1e-6)
        assert resp.normalization.std == pytest.approx(std, abs=1e-6)
        assert resp.scores[0] == pytest.approx((resp.raw_scores[0] - mean) / std, abs=1e-5)
        m1 = sum(r1) / 2
        assert s1 == pytest.approx([(r - m1) / abs(r1[0] - r1[1]) * 2 ** 0.5 for r in r1], abs=1e-5)

        rule_cfg = RewardConfig(rule="instructrl.reward.rules:exact_match", tokenizer=str(reward_model_dir),
                                server=ServerConfig(port=0, metrics_port=-1))
        async with running(rule_cfg) as srv, RewardClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as client:
            scores, raw = await client.score([("2+2=", " 4", {"answer": "4"}), ("2+2=", "5", {"answer": "4"})])
            assert scores == raw == [1.0, 0.0]
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the rule rejects a missing answer
                await client.score([("2+2=", "4")])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (await client.score([("q", "a", {"answer": "a"})]))[0] == [1.0]
            resp = await client.stub.Score(score_request([("q", "a", {"answer": "a"})]))
            assert resp.model == "instructrl.reward.rules:exact_match"
    asyncio.run(main())


def test_load_32_concurrent_clients_match_unbatched(reward_model_dir, reward_scorer):
    rng = random.Random(0)
    work = [[_random_items(rng, rng.randint(1, 3)) for _ in range(4)] for _ in range(32)]  # 128 requests
    want = [[score(reward_scorer, req, batched=False) for req in client] for client in work]

    async def one_client(addr, reqs):
        async with RewardClient(ClientConfig(address=addr, timeout_s=60)) as c:
            return [(await c.score([(x.prompt, x.response) for x in req]))[1] for req in reqs]

    async def main():
        async with running(_cfg(reward_model_dir, batching=BatchingConfig(max_wait_ms=10)), reward_scorer) as srv:
            before = _batches()
            got = await asyncio.gather(*[one_client(f"127.0.0.1:{srv.port}", reqs) for reqs in work])
            return got, _batches() - before

    got, forwards = asyncio.run(main())
    for g_client, w_client in zip(got, want, strict=True):
        for g, w in zip(g_client, w_client, strict=True):
            assert g == pytest.approx(w, abs=ATOL)
    assert forwards < 128 / 2, f"{forwards} forward passes for 128 requests: batching did not merge"


def test_graceful_stop_finishes_in_flight_requests(reward_model_dir, reward_scorer):
    async def main():
        srv = await reward_server(_cfg(reward_model_dir, batching=BatchingConfig(max_wait_ms=200)),
                                 reward_scorer).start()
        async with RewardClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as c:
            calls = [asyncio.ensure_future(c.score([("a", f"b {k}")])) for k in range(8)]
            await asyncio.sleep(0.1)  # queued in the batcher, waiting for max_wait_ms
            await srv.stop(grace=5)
            results = await asyncio.gather(*calls)
        assert all(len(s) == 1 for s, _ in results)
    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_subprocess_serves_health_and_scores(reward_model_dir, tmp_path):
    port = _free_port()
    cfg = tmp_path / "reward.yaml"
    cfg.write_text(f"model: {reward_model_dir}\nserver:\n  port: {port}\n  metrics_port: -1\n"
                   "batching:\n  max_wait_ms: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "instructrl.cli", "serve", "reward", "--config", str(cfg),
                             "torch_threads=1"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        async def main():
            ch = aio_channel(ClientConfig(address=f"127.0.0.1:{port}"))
            await wait_healthy(ch, SERVICE_NAME, timeout_s=60)
            resp = await reward_pb2_grpc.RewardServiceStub(ch).Score(score_request([("a", "b")]), timeout=30)
            await ch.close()
            return resp
        resp = asyncio.run(main())
        assert len(resp.raw_scores) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "signal received" in (tmp_path / "server.log").read_text()


def _make_certs(d) -> None:
    """A CA, and a server and a client certificate it signed (both valid for 127.0.0.1 and localhost)."""
    def run(*a):
        subprocess.run(a, check=True, capture_output=True, cwd=d)
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca")
    for who in ("server", "client"):
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
        run("openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", "-copy_extensions", "copy")


def test_mtls_with_token(reward_model_dir, reward_scorer, tmp_path):
    from instructrl.serving.server import TLSConfig

    _make_certs(tmp_path)
    tls = TLSConfig(str(tmp_path / "server.crt"), str(tmp_path / "server.key"), str(tmp_path / "ca.crt"), True)
    ca, cert, key = (str(tmp_path / f) for f in ("ca.crt", "client.crt", "client.key"))

    async def main():
        cfg = _cfg(reward_model_dir, server=ServerConfig(port=0, metrics_port=-1, tls=tls, token="t0k"))
        async with running(cfg, reward_scorer) as srv:
            addr = f"localhost:{srv.port}"
            async with RewardClient(ClientConfig(address=addr, ca_file=ca, cert_file=cert, key_file=key,
                                                 token="t0k")) as good:
                assert len((await good.score([("a", "b")]))[1]) == 1
            async with RewardClient(ClientConfig(address=addr, ca_file=ca, cert_file=cert, key_file=key)) as no_tok:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await no_tok.score([("a", "b")])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            async with RewardClient(ClientConfig(address=addr, ca_file=ca, token="t0k", timeout_s=5)) as no_cert:
                with pytest.raises(grpc.aio.AioRpcError):
                    await no_cert.score([("a", "b")])
    asyncio.run(main())


def test_saved_normalisation_is_the_same_on_every_replica(reward_model_dir, reward_scorer, tmp_path):
    """InstructGPT's bias from the RM stage's statistics, read from instructrl.json."""
    import json
    import shutil

    from instructrl.config import ConfigError

    model = tmp_path / "rm"
    shutil.copytree(reward_model_dir, model)
    info = json.loads((model / "instructrl.json").read_text())
    (model / "instructrl.json").write_text(json.dumps({**info, "reward_mean": 0.5, "reward_std": 2.0}))

    async def main():
        outs = []
        for _ in range(2):  # two replicas, each started fresh
            cfg = _cfg(model)
            cfg.normalization.enabled, cfg.normalization.source = True, "saved"
            async with running(cfg, reward_scorer) as srv:
                async with RewardClient(ClientConfig(address=f"127.0.0.1:{srv.port}")) as client:
                    resp = await client.stub.Score(score_request([("a", "b"), ("c", "d e f")]))
                    outs.append(resp)
        for resp in outs:
            assert list(resp.scores) == pytest.approx([(r - 0.5) / 2.0 for r in resp.raw_scores], abs=1e-6)
            assert (resp.normalization.mean, resp.normalization.std, resp.normalization.count) == (0.5, 2.0, 0)
        assert list(outs[0].scores) == list(outs[1].scores)
    asyncio.run(main())

    (model / "instructrl.json").write_text(json.dumps(info))  # what a non-RM directory looks like
    cfg = _cfg(model)
    cfg.normalization.enabled, cfg.normalization.source = True, "saved"
    with pytest.raises(ConfigError, match="reward_mean"):
        reward_server(cfg, reward_scorer)
