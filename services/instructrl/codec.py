"""Tensor <-> `instructrl.v1.Tensor` codec: raw little-endian bytes, never pickle.

The wire format follows KServe's open inference protocol (v2): a datatype name,
a shape, and the C-order bytes. Decoding validates that the byte count matches
shape x itemsize, so a corrupt message raises `CodecError` instead of producing
garbage.

Per-token data (token ids, log-probabilities) has one encoding everywhere, in RPCs
and in the `Experience` record: a 1-D `Tensor`, INT32 for token ids and FP32 for
log-probs. `tokens`/`logprobs` write it, `token_array`/`logprob_array` read it back
as numpy views (no copy), and accept nothing else. It was chosen by measurement:
decoding a record of 4 such tensors costs the learner ~7 us against ~20 us for the
same data as packed repeated fields (`bench/buffer.py`, `decode_us_per_record`).

numpy only at import; torch is imported by the functions that take or make torch tensors.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from instructrl.v1 import common_pb2

if TYPE_CHECKING:
    import torch

TOKEN_DATATYPE = "INT32"   # every per-token id tensor
LOGPROB_DATATYPE = "FP32"  # every per-token log-probability tensor
_TOKEN_NP, _LOGPROB_NP = np.dtype("<i4"), np.dtype("<f4")

# v2 datatype name -> numpy dtype (little-endian). BF16 has no numpy dtype: it
# travels as raw 2-byte words and is rebuilt through torch.
_NP = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
ITEMSIZE = {**{name: dt.itemsize for name, dt in _NP.items()}, "BF16": 2}

TokenIds = Seq[int] | np.ndarray


class CodecError(ValueError):
    """A tensor message that cannot be decoded (unknown dtype, wrong byte count)."""


@functools.cache
def _torch_names() -> dict:
    import torch

    return {torch.bool: "BOOL", torch.uint8: "UINT8", torch.int8: "INT8", torch.int16: "INT16",
            torch.int32: "INT32", torch.int64: "INT64", torch.float16: "FP16",
            torch.bfloat16: "BF16", torch.float32: "FP32", torch.float64: "FP64"}


def datatype_name(dtype: torch.dtype) -> str:
    """The v2 datatype name of a torch dtype (`torch.float32` -> "FP32")."""
    try:
        return _torch_names()[dtype]
    except KeyError:
        raise CodecError(f"unsupported dtype {dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a v2 datatype name ("BF16" -> `torch.bfloat16`)."""
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise CodecError(f"unknown datatype {name!r}") from None


@functools.cache
def _torch_dtypes() -> dict:
    return {n: dtype for dtype, n in _torch_names().items()}


def encode(x: torch.Tensor | np.ndarray) -> common_pb2.Tensor:
    """Encode a CPU tensor or array as a `Tensor` message (C-order bytes)."""
    import torch

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
    import torch

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


# --- per-token data ---------------------------------------------------------------
def tokens(ids: TokenIds) -> common_pb2.Tensor:
    """Token ids as the INT32 (n,) `Tensor` every message carries."""
    arr = np.asarray(ids, dtype=_TOKEN_NP).reshape(-1)
    return common_pb2.Tensor(datatype=TOKEN_DATATYPE, shape=[arr.size], raw_data=arr.tobytes())


def logprobs(values: Seq[float] | np.ndarray) -> common_pb2.Tensor:
    """Log-probabilities as the FP32 (n,) `Tensor` every message carries."""
    arr = np.asarray(values, dtype=_LOGPROB_NP).reshape(-1)
    return common_pb2.Tensor(datatype=LOGPROB_DATATYPE, shape=[arr.size], raw_data=arr.tobytes())


def _array_1d(msg: common_pb2.Tensor, datatype: str, dtype: np.dtype, where: str) -> np.ndarray:
    if msg.datatype != datatype:
        raise CodecError(f"{where}: datatype {msg.datatype or 'unset'}, expected {datatype}")
    shape, data = list(msg.shape), msg.raw_data
    if len(shape) != 1 or shape[0] < 0 or len(data) != shape[0] * dtype.itemsize:
        raise CodecError(f"{where}: {datatype}{shape} with {len(data)} bytes is not a 1-D "
                         f"{datatype} tensor ({dtype.itemsize} bytes an element)")
    return np.frombuffer(data, dtype=dtype)


def token_array(msg: common_pb2.Tensor, where: str = "token_ids") -> np.ndarray:
    """A read-only int32 (n,) view of a token-id `Tensor`; `CodecError` naming `where` otherwise."""
    return _array_1d(msg, TOKEN_DATATYPE, _TOKEN_NP, where)


def logprob_array(msg: common_pb2.Tensor, where: str = "logprobs") -> np.ndarray:
    """A read-only float32 (n,) view of a log-prob `Tensor`; `CodecError` naming `where` otherwise."""
    return _array_1d(msg, LOGPROB_DATATYPE, _LOGPROB_NP, where)


def sequence(x: str | TokenIds | common_pb2.Tensor | common_pb2.Sequence) -> common_pb2.Sequence:
    """Text, token ids or a token `Tensor` as a `Sequence` message (a `Sequence` passes through)."""
    if isinstance(x, common_pb2.Sequence):
        return x
    if isinstance(x, str):
        return common_pb2.Sequence(text=x)
    if isinstance(x, common_pb2.Tensor):
        return common_pb2.Sequence(token_ids=x)
    return common_pb2.Sequence(token_ids=tokens(x))


def sequence_value(seq: common_pb2.Sequence, where: str) -> str | list[int]:
    """The text or the token ids of a `Sequence`; `CodecError` naming `where` when neither is set
    or the ids are not INT32 (n,)."""
    kind = seq.WhichOneof("kind")
    if kind == "text":
        return seq.text
    if kind == "token_ids":
        return token_array(seq.token_ids, f"{where}.token_ids").tolist()
    raise CodecError(f"{where}: set text or token_ids")
