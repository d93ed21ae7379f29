"""Domain errors raised by transport-free cores, mapped to gRPC codes in one place.

Cores raise these (or plain `ValueError` for bad input); `ErrorAndMetricsInterceptor`
(serving/interceptors.py) turns them into status codes with `status_of`, so servicers stay
a few lines each.
"""
from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError


class ServiceError(Exception):
    """Base class: an error with a gRPC status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError, ValueError):
    """The request is malformed (empty batch, too long, out of vocabulary...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    """The service is not in a state to do this (e.g. no weight group joined)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    """Given up for a newer request of the same kind (e.g. a join superseded by a later JoinWeightGroup)."""

    code = grpc.StatusCode.ABORTED


class PermissionDenied(ServiceError):
    """The caller may not ask for this (e.g. an address outside the learner's register_allow)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    """Overloaded: too many requests in flight or a queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """Temporarily unable to serve (draining, paused for a weight update)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The work did not finish within its deadline or timeout."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for an exception raised by a core."""
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, (ValueError, TypeError, DecodeError)):  # DecodeError: undecodable request bytes
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL
