"""The shared gRPC scaffolding over real sockets: health, reflection, errors, token, TLS."""
from __future__ import annotations

import asyncio
import subprocess
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instructrl.codec import logprob_array, logprobs, token_array, tokens
from instructrl.serving.client import ClientConfig, aio_channel, sync_channel
from instructrl.serving.errors import ResourceExhausted
from instructrl.serving.server import GrpcServer, ServerConfig, TLSConfig
from instructrl.v1 import reference_pb2, reference_pb2_grpc

NAME = "instructrl.v1.ReferenceService"


class _EchoLengths(reference_pb2_grpc.ReferenceServiceServicer):
    """A minimal servicer exercising the scaffolding only (the real one is tested elsewhere)."""

    async def LogProbs(self, request, context):
        if not request.items:
            raise ValueError("items: empty batch")
        if len(request.items) > 3:
            raise ResourceExhausted("too many items")
        return reference_pb2.LogProbsResponse(results=[
            reference_pb2.LogProbsResult(logprobs=logprobs([0.0] * (len(token_array(i.token_ids)) - i.response_start)))
            for i in request.items])


def _start(cfg: ServerConfig) -> GrpcServer:
    return GrpcServer("reference", cfg, [(reference_pb2_grpc.add_ReferenceServiceServicer_to_server,
                                          _EchoLengths(), NAME)])


def _req(n: int) -> reference_pb2.LogProbsRequest:
    return reference_pb2.LogProbsRequest(
        items=[reference_pb2.LogProbsItem(token_ids=tokens([1, 2, 3]), response_start=1)] * n)


def test_health_reflection_errors_and_metrics():
    async def main():
        srv = await _start(ServerConfig(port=0, metrics_port=0)).start()
        ch = aio_channel(ClientConfig(address=f"127.0.0.1:{srv.port}"))
        h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=NAME))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = [r async for r in refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
        names = {s.name for s in resp[0].list_services_response.service}
        assert NAME in names and "grpc.health.v1.Health" in names
        stub = reference_pb2_grpc.ReferenceServiceStub(ch)
        ok = await stub.LogProbs(_req(2))
        assert [len(logprob_array(r.logprobs)) for r in ok.results] == [2, 2]
        for req, code in ((_req(0), grpc.StatusCode.INVALID_ARGUMENT),
                          (_req(5), grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.LogProbs(req)
            assert e.value.code() == code
        assert (await stub.LogProbs(_req(1))).results  # still up after errors
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
        assert 'instructrl_grpc_requests_total{code="INVALID_ARGUMENT",method="LogProbs",service="reference"}' in text
        await srv.stop(0)
        h2 = None
        try:
            h2 = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            pass
        assert h2 is None
        await ch.close()
    asyncio.run(main())


def test_bearer_token():
    async def main():
        srv = await _start(ServerConfig(port=0, metrics_port=-1, token="s3cret")).start()
        addr = f"127.0.0.1:{srv.port}"
        anon = aio_channel(ClientConfig(address=addr))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await reference_pb2_grpc.ReferenceServiceStub(anon).LogProbs(_req(1))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # health stays open for kubelet probes
        h = await health_pb2_grpc.HealthStub(anon).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        authed = aio_channel(ClientConfig(address=addr, token="s3cret"))
        assert (await reference_pb2_grpc.ReferenceServiceStub(authed).LogProbs(_req(1))).results
        await srv.stop(0)
    asyncio.run(main())


def _make_certs(d, names=("server", "client"), san="DNS:localhost,IP:127.0.0.1", *extensions: str):
    """A CA (`ca.crt`) and, per name, `<name>.crt`/`<name>.key` signed by it with `san`."""
    def run(*a):
        subprocess.run(a, check=True, capture_output=True, cwd=d)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=test-ca")
    for who in names:
        extra = [a for ext in extensions for a in ("-addext", ext)]
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN={who}", "-addext", f"subjectAltName={san}", *extra)
        run("openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.crt", "-days", "2", "-copy_extensions", "copy")


def test_mtls_and_plaintext_health_port(tmp_path):
    _make_certs(tmp_path)
    tls = TLSConfig(str(tmp_path / "server.crt"), str(tmp_path / "server.key"), str(tmp_path / "ca.crt"), True)

    async def main():
        srv = await _start(ServerConfig(port=0, metrics_port=-1, health_port=0, tls=tls)).start()
        addr = f"localhost:{srv.port}"
        good = aio_channel(ClientConfig(address=addr, ca_file=str(tmp_path / "ca.crt"),
                                        cert_file=str(tmp_path / "client.crt"),
                                        key_file=str(tmp_path / "client.key")))
        assert (await reference_pb2_grpc.ReferenceServiceStub(good).LogProbs(_req(1))).results
        no_cert = aio_channel(ClientConfig(address=addr, ca_file=str(tmp_path / "ca.crt")))
        with pytest.raises(grpc.aio.AioRpcError):
            await reference_pb2_grpc.ReferenceServiceStub(no_cert).LogProbs(_req(1), timeout=5)
        plain = aio_channel(ClientConfig(address=f"127.0.0.1:{srv.health_port}"))
        h = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest())
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:  # only health on the plaintext port
            await reference_pb2_grpc.ReferenceServiceStub(plain).LogProbs(_req(1))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await srv.stop(0)
    asyncio.run(main())


def test_client_tls_from_the_pod_environment():
    """The chart's layout: one certificate for every role at $INSTRUCTRL_TLS_DIR, named for no address."""
    from instructrl.serving.client import resolve_tls

    env = {"INSTRUCTRL_TLS_DIR": "/etc/instructrl/tls", "INSTRUCTRL_MTLS": "true",
           "INSTRUCTRL_TLS_SERVER_NAME": "instructrl.internal"}
    got = resolve_tls(ClientConfig(address="10.0.0.7:50051"), env)
    assert (got.ca_file, got.cert_file, got.key_file, got.server_name_override) == (
        "/etc/instructrl/tls/ca.crt", "/etc/instructrl/tls/tls.crt", "/etc/instructrl/tls/tls.key",
        "instructrl.internal")
    tls_only = resolve_tls(ClientConfig(), {"INSTRUCTRL_TLS_DIR": "/t", "INSTRUCTRL_MTLS": "false"})
    assert (tls_only.ca_file, tls_only.cert_file, tls_only.server_name_override) == ("/t/ca.crt", "", "")
    explicit = ClientConfig(ca_file="/mine/ca.pem")
    assert resolve_tls(explicit, env) == explicit           # configured fields win
    assert resolve_tls(ClientConfig(), {}) == ClientConfig()  # no mount: plaintext


def test_mtls_with_the_mounted_certificate_over_real_sockets(tmp_path, monkeypatch):
    # one certificate for servers and clients alike, valid for a name and not for the address used
    _make_certs(tmp_path, ("tls",), "DNS:instructrl.internal", "extendedKeyUsage=serverAuth,clientAuth")
    tls = TLSConfig.from_dir(str(tmp_path), mtls=True)

    async def main():
        srv = await _start(ServerConfig(port=0, metrics_port=-1, tls=tls)).start()
        addr = f"127.0.0.1:{srv.port}"
        try:
            monkeypatch.setenv("INSTRUCTRL_TLS_DIR", str(tmp_path))
            monkeypatch.setenv("INSTRUCTRL_MTLS", "true")
            monkeypatch.setenv("INSTRUCTRL_TLS_SERVER_NAME", "instructrl.internal")
            async with aio_channel(ClientConfig(address=addr)) as ch:  # nothing configured but the address
                assert (await reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(_req(1), timeout=10)).results

            def blocking():  # the learner's control RPCs to the replicas use the blocking channel
                with sync_channel(ClientConfig(address=addr)) as ch:
                    return reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(_req(1), timeout=10)
            assert (await asyncio.to_thread(blocking)).results
            monkeypatch.delenv("INSTRUCTRL_TLS_SERVER_NAME")  # the address is not in the certificate
            async with aio_channel(ClientConfig(address=addr)) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(_req(1), timeout=5)
            monkeypatch.delenv("INSTRUCTRL_TLS_DIR")  # plaintext against a TLS server
            async with aio_channel(ClientConfig(address=addr)) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(_req(1), timeout=5)
        finally:
            await srv.stop(0)
    asyncio.run(main())


def test_a_client_finds_a_server_that_starts_late_within_seconds():
    """A worker's channel is made before its rollout server has loaded vLLM; after 25 s of
    refused connections gRPC's default backoff would wait up to ~20 s more (it grows to 120 s)."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run() -> float:
        ch = aio_channel(ClientConfig(address=f"127.0.0.1:{port}"))
        stub = reference_pb2_grpc.ReferenceServiceStub(ch)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:  # the server is not there yet
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.LogProbs(_req(1), timeout=1)
            await asyncio.sleep(1)
        server = _start(ServerConfig(host="127.0.0.1", port=port, metrics_port=-1))
        await server.start()
        t0 = time.monotonic()
        try:
            await stub.LogProbs(_req(1), timeout=10, wait_for_ready=True)
            return time.monotonic() - t0
        finally:
            await ch.close()
            await server.stop(0)
    assert asyncio.run(run()) < 3.0
