"""Bucket planning: which parameter travels in which flat byte bucket, at which offset.

A weight update moves every parameter of the policy, in the order the learner
yields them, packed into flat `uint8` buckets of at most `bucket_bytes` each (a
parameter larger than that gets a bucket of its own; a parameter is never split).
Buckets are raw bytes, so one bucket may mix dtypes (bf16 matrices next to fp32
norms) and the receiver rebuilds each tensor as a typed view of its slice.

Every offset is a multiple of `ALIGN` bytes so those views are aligned for any
dtype. The plan is a `rollout_pb2.WeightManifest`: it crosses the process
boundary inside the `UpdateWeights` control RPC (protobuf, never pickle).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from instructrl.codec import ITEMSIZE, datatype_name, torch_dtype
from instructrl.v1 import rollout_pb2

ALIGN = 64  # bytes; the largest dtype is 8 bytes, 64 also keeps slices cache-line aligned

ParamMeta = tuple[str, torch.dtype, tuple[int, ...]]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(named_params: Sequence[ParamMeta], bucket_bytes: int) -> rollout_pb2.WeightManifest:
    """Group parameters, in the given order, into flat byte buckets of <= `bucket_bytes`.

    `named_params` is `[(name, dtype, shape), ...]`. A bucket is closed when the
    next parameter would not fit; a parameter alone over `bucket_bytes` gets its
    own bucket. Raises `ValueError` on duplicate names or a non-positive size.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    manifest = rollout_pb2.WeightManifest()
    seen: set[str] = set()
    bucket, used = 0, 0
    for name, dtype, shape in named_params:
        if name in seen:
            raise ValueError(f"parameter {name!r} appears twice")
        seen.add(name)
        dt = datatype_name(dtype)
        nbytes = math.prod(shape) * ITEMSIZE[dt]
        if used and _align(used) + nbytes > bucket_bytes:
            manifest.buckets.add(index=bucket, nbytes=used)
            bucket, used = bucket + 1, 0
        offset = _align(used)
        manifest.params.add(name=name, datatype=dt, shape=list(shape), bucket=bucket,
                            offset=offset, nbytes=nbytes)
        used = offset + nbytes
    if used or manifest.params:
        manifest.buckets.add(index=bucket, nbytes=used)
    return manifest


def param_meta(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[ParamMeta]:
    """`[(name, dtype, shape)]` of named tensors (the input of `plan_buckets`)."""
    return [(n, t.dtype, tuple(t.shape)) for n, t in named_tensors]


def total_bytes(manifest: rollout_pb2.WeightManifest) -> int:
    """Bytes on the wire for one update (sum of bucket sizes, alignment padding included)."""
    return sum(b.nbytes for b in manifest.buckets)


def params_by_bucket(manifest: rollout_pb2.WeightManifest) -> list[list[rollout_pb2.ParamSpec]]:
    """The manifest's params grouped per bucket, in bucket order."""
    out: list[list[rollout_pb2.ParamSpec]] = [[] for _ in manifest.buckets]
    for p in manifest.params:
        out[p.bucket].append(p)
    return out


def validate(manifest: rollout_pb2.WeightManifest) -> None:
    """Check that a received manifest is self-consistent; raises `ValueError` naming the problem.
    The rollout engine calls it once per UpdateWeights request; nothing downstream re-checks."""
    sizes = {}
    for i, b in enumerate(manifest.buckets):
        if b.index != i:
            raise ValueError(f"bucket {i} has index {b.index}")
        if b.nbytes < 0:
            raise ValueError(f"bucket {i} has negative size")
        sizes[i] = b.nbytes
    for p in manifest.params:
        if p.bucket not in sizes:
            raise ValueError(f"{p.name}: bucket {p.bucket} is not in the manifest")
        if p.datatype not in ITEMSIZE:
            raise ValueError(f"{p.name}: unknown datatype {p.datatype!r}")
        expect = math.prod(p.shape) * ITEMSIZE[p.datatype]
        if p.nbytes != expect:
            raise ValueError(f"{p.name}: {p.nbytes} bytes for {p.datatype}{list(p.shape)}, expected {expect}")
        if p.offset % ALIGN or p.offset < 0 or p.offset + p.nbytes > sizes[p.bucket]:
            raise ValueError(f"{p.name}: offset {p.offset} + {p.nbytes} outside bucket {p.bucket}")


def unpack(bucket: torch.Tensor, specs: Sequence[rollout_pb2.ParamSpec]) -> list[tuple[str, torch.Tensor]]:
    """Typed views (no copy) of each parameter in a received flat `uint8` bucket."""
    out = []
    for p in specs:
        flat = bucket[p.offset:p.offset + p.nbytes]
        out.append((p.name, flat.view(torch_dtype(p.datatype)).view(tuple(p.shape))))
    return out


def pack_into(bucket: torch.Tensor, specs: Sequence[rollout_pb2.ParamSpec],
              tensors: Sequence[torch.Tensor]) -> None:
    """Copy `tensors` (matching `specs`, same order) into the flat `uint8` `bucket`."""
    for p, t in zip(specs, tensors, strict=True):
        if datatype_name(t.dtype) != p.datatype or tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{p.name}: got {t.dtype}{list(t.shape)}, manifest says "
                             f"{p.datatype}{list(p.shape)}")
        src = t.detach()
        if not src.is_contiguous():
            src = src.contiguous()
        bucket[p.offset:p.offset + p.nbytes].copy_(src.reshape(-1).view(torch.uint8), non_blocking=True)
