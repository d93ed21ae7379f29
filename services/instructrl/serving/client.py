"""Client channels with the same TLS/token options the servers take.

In a pod, unset TLS fields fall back to the pod's certificate mount, as the token falls
back to $INSTRUCTRL_TOKEN (the Helm chart sets these; explicit fields always win):

    $INSTRUCTRL_TLS_DIR          ca.crt verifies the server (TLS on); tls.crt/tls.key are ours
    $INSTRUCTRL_MTLS=true        present tls.crt/tls.key as the client certificate
    $INSTRUCTRL_TLS_SERVER_NAME  the name to expect in the server's certificate (replicas are
                                 reached by pod IP, which no certificate can list in advance)
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping

import grpc

from instructrl.config import field


@dataclasses.dataclass
class ClientConfig:
    address: str = field("127.0.0.1:50051", help="host:port of the service")
    ca_file: str = field("", help="PEM CA to verify the server; empty = $INSTRUCTRL_TLS_DIR/ca.crt when "
                                   "that is set, else plaintext")
    cert_file: str = field("", help="client certificate for mTLS; empty = $INSTRUCTRL_TLS_DIR/tls.crt "
                                    "when $INSTRUCTRL_MTLS is true")
    key_file: str = field("", help="client key for mTLS; empty = $INSTRUCTRL_TLS_DIR/tls.key when "
                                   "$INSTRUCTRL_MTLS is true")
    token: str = field("", help="bearer token; also read from $INSTRUCTRL_TOKEN")
    timeout_s: float = field(60.0, help="default deadline of a call")
    server_name_override: str = field("", help="TLS server name to expect (IP addresses, tests); "
                                               "empty = $INSTRUCTRL_TLS_SERVER_NAME")


TLS_DIR_ENV, MTLS_ENV, SERVER_NAME_ENV = "INSTRUCTRL_TLS_DIR", "INSTRUCTRL_MTLS", "INSTRUCTRL_TLS_SERVER_NAME"
TOKEN_ENV = "INSTRUCTRL_TOKEN"


def resolve_tls(cfg: ClientConfig, environ: Mapping[str, str] | None = None) -> ClientConfig:
    """`cfg` with its unset TLS fields taken from the pod's environment (see the module doc)."""
    env = os.environ if environ is None else environ
    tls_dir = env.get(TLS_DIR_ENV, "")
    if not tls_dir or cfg.ca_file:  # explicitly configured, or no mounted certificates
        return cfg
    d = pathlib.Path(tls_dir)
    mtls = env.get(MTLS_ENV, "").lower() in ("1", "true", "yes")
    return dataclasses.replace(
        cfg, ca_file=str(d / "ca.crt"),
        cert_file=cfg.cert_file or (str(d / "tls.crt") if mtls else ""),
        key_file=cfg.key_file or (str(d / "tls.key") if mtls else ""),
        server_name_override=cfg.server_name_override or env.get(SERVER_NAME_ENV, ""))


class _TokenAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str):
        self.token = token

    def __call__(self, context, callback):
        callback((("authorization", f"Bearer {self.token}"),), None)


# A client that starts before its server (a worker beside a vLLM still loading, the learner's
# channel to a restarted replica) must find it within seconds: gRPC's default reconnect backoff
# grows to 120 s while the server is down.
RECONNECT_BACKOFF_MS = {"grpc.initial_reconnect_backoff_ms": 200, "grpc.min_reconnect_backoff_ms": 200,
                        "grpc.max_reconnect_backoff_ms": 2000}


# Spread calls over every address the target resolves to (a headless Service's DNS name lists
# each ready pod), instead of gRPC's default pick_first (one pod gets all the load). The servers
# close connections after `server.max_connection_age_s`, so the name is resolved again and pods
# added since get calls too.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_options(cfg: ClientConfig, max_mb: int, balanced: bool = False) -> list[tuple[str, object]]:
    """The options of a channel to `cfg.address`; `balanced`: round_robin over its addresses."""
    mb = max_mb * 1024 * 1024
    opts: list[tuple[str, object]] = [("grpc.max_send_message_length", mb), ("grpc.max_receive_message_length", mb),
                                      *RECONNECT_BACKOFF_MS.items()]
    if cfg.server_name_override:
        opts.append(("grpc.ssl_target_name_override", cfg.server_name_override))
    if balanced:
        opts.append(("grpc.service_config", ROUND_ROBIN))
    return opts


def _credentials(cfg: ClientConfig):
    token = cfg.token or os.environ.get(TOKEN_ENV, "")
    if not cfg.ca_file:
        return None, token
    read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(cfg.ca_file), read(cfg.key_file), read(cfg.cert_file))
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_TokenAuth(token)))
    return creds, token


class _PlainTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the bearer token on plaintext channels (gRPC refuses call credentials there)."""

    def __init__(self, token: str):
        self.md = ("authorization", f"Bearer {token}")

    def _details(self, d):
        md = list(d.metadata or []) + [self.md]
        return grpc.aio.ClientCallDetails(d.method, d.timeout, md, d.credentials, d.wait_for_ready)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


def aio_channel(cfg: ClientConfig, max_message_mb: int = 64, balanced: bool = False) -> grpc.aio.Channel:
    """An asyncio channel to `cfg.address` with TLS/mTLS and token as configured; `balanced`:
    round_robin over every address the target resolves to (replicated services)."""
    cfg = resolve_tls(cfg)
    creds, token = _credentials(cfg)
    opts = channel_options(cfg, max_message_mb, balanced)
    if creds is not None:
        return grpc.aio.secure_channel(cfg.address, creds, options=opts)
    inter = [_PlainTokenInterceptor(token)] if token else None
    return grpc.aio.insecure_channel(cfg.address, options=opts, interceptors=inter)


def sync_channel(cfg: ClientConfig, max_message_mb: int = 64) -> grpc.Channel:
    """A blocking channel with the same options (CLI tools, the learner's control RPCs)."""
    cfg = resolve_tls(cfg)
    creds, token = _credentials(cfg)
    opts = channel_options(cfg, max_message_mb)
    if creds is not None:
        return grpc.secure_channel(cfg.address, creds, options=opts)
    ch = grpc.insecure_channel(cfg.address, options=opts)
    if token:
        class _I(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
            def intercept_unary_unary(self, cont, d, req):
                return cont(_CallDetails(d, token), req)

            def intercept_unary_stream(self, cont, d, req):
                return cont(_CallDetails(d, token), req)
        ch = grpc.intercept_channel(ch, _I())
    return ch


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, d, token: str):
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = list(d.metadata or []) + [("authorization", f"Bearer {token}")]
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


async def wait_healthy(channel: grpc.aio.Channel, service: str = "", timeout_s: float = 60.0) -> None:
    """Poll the standard health service until SERVING or raise TimeoutError."""
    import asyncio
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError as e:
            last = e
        await asyncio.sleep(0.2)
    raise TimeoutError(f"service not healthy after {timeout_s}s: {last}")
