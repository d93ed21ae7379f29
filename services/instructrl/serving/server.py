"""One way to run a gRPC service: aio server + health + reflection + metrics + TLS/token.

Every `services/instructrl/<name>/server.py` builds its servicer over a transport-free core
and hands it to `GrpcServer`; this file holds everything else the design asks of
a service (standard health service, reflection, Prometheus `/metrics`, TLS or
mTLS, a bearer-token option, graceful shutdown that drains before stopping).
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import pathlib
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from instructrl.config import field
from instructrl.serving.interceptors import ErrorAndMetricsInterceptor, TokenAuthInterceptor
from instructrl.serving.metrics import start_metrics_server

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TLSConfig:
    cert_file: str = field("", help="PEM server certificate; empty = plaintext")
    key_file: str = field("", help="PEM private key of cert_file")
    ca_file: str = field("", help="PEM CA bundle; with require_client_auth this enables mTLS")
    require_client_auth: bool = field(False, help="mTLS: clients must present a cert signed by ca_file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @classmethod
    def from_dir(cls, path: str, mtls: bool = False) -> TLSConfig:
        d = pathlib.Path(path)
        return cls(str(d / "tls.crt"), str(d / "tls.key"),
                   str(d / "ca.crt") if (d / "ca.crt").exists() else "", mtls)


@dataclasses.dataclass
class ServerConfig:
    host: str = field("127.0.0.1", help="address to bind the gRPC server to (0.0.0.0 in pods)")
    port: int = field(50051, help="gRPC port (0 = pick a free one)")
    metrics_port: int = field(0, help="Prometheus /metrics HTTP port (0 = a free one, -1 = off)")
    health_port: int = field(
        -1, help="extra plaintext port serving only grpc.health.v1 (for probes under mTLS); -1 = off")
    tls: TLSConfig = field(default_factory=TLSConfig, help="TLS / mTLS")
    token: str = field("", help="bearer token clients must send; also read from $INSTRUCTRL_TOKEN")
    grace_s: float = field(10.0, help="seconds to drain in-flight RPCs on shutdown")
    max_message_mb: int = field(64, help="max gRPC message size in MiB")
    max_connection_age_s: float = field(0.0, help="close each client connection after this long (GOAWAY; calls in "
                                                  "flight finish), so round_robin clients resolve the service again "
                                                  "and new pods get load (0 = never)")

    def resolved_token(self) -> str:
        return self.token or os.environ.get("INSTRUCTRL_TOKEN", "")


def _server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    key = pathlib.Path(tls.key_file).read_bytes()
    cert = pathlib.Path(tls.cert_file).read_bytes()
    ca = pathlib.Path(tls.ca_file).read_bytes() if tls.ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=tls.require_client_auth)


class GrpcServer:
    """An aio gRPC server with the standard extras. Use `await start()`, `await stop()`.

    `register` is a list of `(add_XServicer_to_server, servicer, full_service_name)`.
    """

    def __init__(self, name: str, cfg: ServerConfig,
                 register: Sequence[tuple[Callable, object, str]]):
        self.name = name
        self.cfg = cfg
        self._register = register
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.port = -1
        self.metrics_port = -1
        self.health_port = -1

    async def _set_status(self, status) -> None:
        names = [""] + [full for _, _, full in self._register]
        for n in names:
            r = self.health.set(n, status)
            if asyncio.iscoroutine(r):
                await r

    async def start(self) -> GrpcServer:
        cfg = self.cfg
        interceptors = [ErrorAndMetricsInterceptor(self.name)]
        token = cfg.resolved_token()
        if token:
            interceptors.insert(0, TokenAuthInterceptor(token))
        mb = cfg.max_message_mb * 1024 * 1024
        options: list[tuple[str, int]] = [("grpc.max_send_message_length", mb),
                                          ("grpc.max_receive_message_length", mb), ("grpc.so_reuseport", 0)]
        if cfg.max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)))
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        for add_fn, servicer, _full in self._register:
            add_fn(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [full for _, _, full in self._register]
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        addr = f"{cfg.host}:{cfg.port}"
        if cfg.tls.enabled:
            self.port = self.server.add_secure_port(addr, _server_credentials(cfg.tls))
        else:
            self.port = self.server.add_insecure_port(addr)
        if self.port == 0:
            raise OSError(f"{self.name}: could not bind {addr}")
        await self.server.start()
        if cfg.health_port >= 0:
            self._health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{cfg.host}:{cfg.health_port}")
            await self._health_server.start()
        self.metrics_port = start_metrics_server(cfg.metrics_port, "0.0.0.0" if cfg.host == "0.0.0.0" else cfg.host)
        # Everything loaded so far (torch, transformers, the model: ~350k objects) lives as long as
        # the process. Move it out of the collector's reach: a full collection over it paused
        # every request in flight for ~170 ms (bench/scoring.py's p99 before this line).
        gc.freeze()
        await self._set_status(health_pb2.HealthCheckResponse.SERVING)
        log.info("%s serving on %s:%d (metrics :%d, tls=%s, token=%s)", self.name, cfg.host,
                 self.port, self.metrics_port, cfg.tls.enabled, bool(token))
        return self

    async def set_serving(self, serving: bool) -> None:
        await self._set_status(health_pb2.HealthCheckResponse.SERVING if serving
                               else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, drain in-flight RPCs for `grace` s, stop."""
        if self.server is None:
            return
        await self.set_serving(False)
        await self.server.stop(self.cfg.grace_s if grace is None else grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        self.server = None

    async def wait(self) -> None:
        """Block until SIGTERM/SIGINT, then stop gracefully."""
        assert self.server is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("%s: signal received, draining for %.1fs", self.name, self.cfg.grace_s)
            await self.stop()
        waiter.cancel()
        stopper.cancel()
