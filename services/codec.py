"""Tensor <-> `instructrl.v1.Tensor` codec: raw little-endian bytes, never pickle.

The wire format follows KServe's open inference protocol (v2): a datatype name,
a shape, and the C-order bytes. Decoding validates that the byte count matches
shape x itemsize, so a corrupt record raises `CodecError` instead of producing
garbage.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from instructrl.v1 import common_pb2

# v2 datatype name -> numpy dtype (little-endian). BF16 has no numpy dtype: it
# travels as raw 2-byte words and is rebuilt through torch.
_NP = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_TORCH = {
    torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8", torch.int16: "INT16",
    torch.int32: "INT32", torch.int64: "INT64", torch.float16: "FP16",
    torch.bfloat16: "BF16", torch.float32: "FP32", torch.float64: "FP64",
}
_FROM_NAME = {v: k for k, v in _TORCH.items()}
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for dt, name in _TORCH.items()}


class CodecError(ValueError):
    """A tensor message that cannot be decoded (unknown dtype, wrong byte count)."""


def datatype_name(dtype: torch.dtype) -> str:
    """The v2 datatype name of a torch dtype (`torch.float32` -> "FP32")."""
    try:
        return _TORCH[dtype]
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a v2 datatype name ("BF16" -> `torch.bfloat16`)."""
    try:
        return _FROM_NAME[name]
    except KeyError:
        raise CodecError(f"unknown datatype {name!r}") from None


def encode(x: torch.Tensor | np.ndarray) -> common_pb2.Tensor:
    """Encode a CPU tensor or array as a `Tensor` message (C-order bytes)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    x = x.detach().to("cpu").contiguous()
    name = datatype_name(x.dtype)
    if x.dtype == torch.bfloat16:
        raw = x.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    else:
        raw = x.numpy().astype(_NP[name], copy=False).tobytes()
    return common_pb2.Tensor(datatype=name, shape=list(x.shape), raw_data=raw)


def decode(msg: common_pb2.Tensor) -> torch.Tensor:
    """Decode a `Tensor` message into a new (writable) CPU torch tensor.

    Raises `CodecError` when the datatype is unknown, a dimension is negative,
    or the byte count is not prod(shape) * itemsize.
    """
    name = msg.datatype
    if name not in ITEMSIZE:
        raise CodecError(f"unknown datatype {name!r}")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise CodecError(f"negative dimension in shape {shape}")
    expect = math.prod(shape) * ITEMSIZE[name]
    if len(msg.raw_data) != expect:
        raise CodecError(
            f"{name}{list(shape)} needs {expect} bytes, message has {len(msg.raw_data)}")
    if name == "BF16":
        words = np.frombuffer(msg.raw_data, dtype="<i2").copy()
        return torch.from_numpy(words).view(torch.bfloat16).reshape(shape)
    arr = np.frombuffer(msg.raw_data, dtype=_NP[name]).copy().reshape(shape)
    return torch.from_numpy(arr)
