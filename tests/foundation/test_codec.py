"""Tensor codec: round trips per dtype, and corrupt messages raise CodecError."""
from __future__ import annotations

import pytest
import torch

from instructrl.codec import CodecError, decode, encode
from instructrl.v1 import common_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool])
def test_round_trip(dtype):
    x = (torch.randn(3, 5) * 10).to(dtype)
    msg = encode(x)
    assert list(msg.shape) == [3, 5]
    y = decode(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert y.dtype == dtype and torch.equal(x, y)


def test_little_endian_bytes_are_the_wire_format():
    msg = encode(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.datatype == "INT32" and msg.raw_data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_empty_and_scalar():
    assert decode(encode(torch.zeros(0, dtype=torch.float32))).shape == (0,)
    assert decode(encode(torch.tensor(2.5))).item() == 2.5


@pytest.mark.parametrize("msg,match", [
    (common_pb2.Tensor(datatype="FP32", shape=[2], raw_data=b"\x00" * 7), "needs 8 bytes"),
    (common_pb2.Tensor(datatype="FP8", shape=[1], raw_data=b"\x00"), "unknown datatype"),
    (common_pb2.Tensor(datatype="INT32", shape=[-1], raw_data=b""), "negative"),
])
def test_corrupt_messages(msg, match):
    with pytest.raises(CodecError, match=match):
        decode(msg)
