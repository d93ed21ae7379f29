"""Server interceptors (grpc.aio): error mapping + metrics, and bearer-token auth.

Errors are mapped to status codes here and nowhere else (KServe's pattern): a
servicer lets `ServiceError`/`ValueError` escape and the client sees the right
code with the message; unexpected exceptions become INTERNAL and are logged.
Request bytes that do not decode reach the same mapping: grpc would answer UNKNOWN
("Unexpected <class DecodeError>") for an exception raised in the deserializer, so the
deserializer hands the error over as an `Undecodable` request and the wrapper raises it.
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from instructrl.serving.errors import status_of
from instructrl.serving.metrics import GRPC_IN_FLIGHT, GRPC_REQUESTS, GRPC_SECONDS

log = logging.getLogger(__name__)

# Health checks and reflection never need a token (kubelet probes carry none).
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _code_name(context) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc
        code = None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


MAX_DETAILS = 2000  # characters of an error message sent back (status details travel in the trailers)


def details_of(exc: BaseException) -> str:
    """The status details for `exc`, cut to MAX_DETAILS: a message quoting a huge request field would
    overflow the client's trailer limit and reach it as RESOURCE_EXHAUSTED instead of its code."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_DETAILS else text[:MAX_DETAILS] + f"... ({len(text)} characters)"


class Undecodable:
    """A request whose bytes the deserializer refused; `error` is raised in the handler."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserialize: Callable | None) -> Callable | None:
    """`deserialize`, returning `Undecodable` instead of raising (None stays None: raw bytes)."""
    if deserialize is None:
        return None

    def run(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and kin: mapped in the handler
            return Undecodable(exc)
    return run


def _wrap(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable):
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), _lenient(handler.request_deserializer), handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), _lenient(handler.request_deserializer), handler.response_serializer)
    return handler  # client/bidi streaming: not used by our APIs


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps core exceptions to gRPC codes and records request counts and latency."""

    def __init__(self, service: str):
        self.service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        service = self.service

        async def _fail(context, exc: BaseException) -> None:
            code = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s %s failed", service, method)
            GRPC_REQUESTS.labels(service, method, code.name).inc()
            await context.abort(code, details_of(exc))

        def wrap_unary(fn):
            async def run(request: Any, context: grpc.aio.ServicerContext):
                t0 = time.perf_counter()
                GRPC_IN_FLIGHT.labels(service).inc()
                try:
                    if isinstance(request, Undecodable):
                        raise request.error
                    resp = await fn(request, context)
                    code = context.code() if hasattr(context, "code") else None
                    GRPC_REQUESTS.labels(service, method, (code or grpc.StatusCode.OK).name).inc()
                    return resp
                except grpc.aio.AbortError:
                    GRPC_REQUESTS.labels(service, method, _code_name(context)).inc()
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status code
                    await _fail(context, exc)
                finally:
                    GRPC_IN_FLIGHT.labels(service).dec()
                    GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - t0)
            return run

        def wrap_stream(fn):
            async def run(request: Any, context: grpc.aio.ServicerContext):
                t0 = time.perf_counter()
                GRPC_IN_FLIGHT.labels(service).inc()
                try:
                    if isinstance(request, Undecodable):
                        raise request.error
                    async for item in fn(request, context):
                        yield item
                    GRPC_REQUESTS.labels(service, method, "OK").inc()
                except grpc.aio.AbortError:
                    GRPC_REQUESTS.labels(service, method, _code_name(context)).inc()
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _fail(context, exc)
                finally:
                    GRPC_IN_FLIGHT.labels(service).dec()
                    GRPC_SECONDS.labels(service, method).observe(time.perf_counter() - t0)
            return run

        return _wrap(handler, wrap_unary, wrap_stream)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        md = dict(details.invocation_metadata or ())
        got = md.get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got_b, self._expected):
            return await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            yield  # pragma: no cover

        handler = await continuation(details)
        if handler is not None and handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)
