"""Prometheus metrics common to every gRPC service (see docs/metrics.md)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

GRPC_REQUESTS = Counter(
    "instructrl_grpc_requests", "RPCs finished, by status code", ["service", "method", "code"])
GRPC_SECONDS = Histogram(
    "instructrl_grpc_request_seconds", "RPC latency", ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
GRPC_IN_FLIGHT = Gauge("instructrl_grpc_in_flight", "RPCs being served", ["service"])

_started: dict[int, object] = {}


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on `port` (0 = a free port); returns the bound port. Idempotent per port."""
    if port < 0:
        return -1
    if port in _started and port != 0:
        return port
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    _started[bound] = server
    return bound
