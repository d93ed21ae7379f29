"""A small gRPC fuzzer driven by server reflection (test code; see test_fuzz.py).

`methods(address)` lists every RPC a server exposes (reflection, so new RPCs are covered
without edits) with its request and response classes; `messages(cls, rng)` yields random and
boundary requests: NaN/inf floats, huge and negative integers, empty and 1 MB strings, long
repeated fields, tensors whose bytes disagree with their dtype and shape, unknown dtypes,
out-of-range enum numbers. `GARBAGE` are request bytes that decode as no message.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

MB = 1 << 20
SKIP_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                 "grpc.reflection.v1.ServerReflection")
GARBAGE = (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0f", b"\x12\xff\xff\xff\xff\x0f")
FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 3.4e38, 1e-45, 0.5, 1.0)
INT32 = (0, 1, -1, 2**31 - 1, -(2**31), 7, 64)
INT64 = INT32 + (2**63 - 1, -(2**63), 2**40)
UINT = (0, 1, 2**32 - 1)
STRINGS = ("", "x", "a b", "\u00e9\u0000\U0001f600", "INT32", "FP32", "FP16", "BOGUS", "127.0.0.1:1",
           "tcp://127.0.0.1:1", "../../etc/passwd", "/tmp/x", "gloo", "nccl", "abc:def")
SCALAR_REPEAT = (0, 1, 2, 3, 1000)
MESSAGE_REPEAT = (0, 1, 2, 5, 40)


@dataclasses.dataclass
class Method:
    path: str  # /package.Service/Method
    request: type
    response: type
    server_streaming: bool


def methods(address: str) -> list[Method]:
    """Every RPC of the server at `address` but health and reflection, found by reflection."""
    with grpc.insecure_channel(address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        pool = descriptor_pool.DescriptorPool(db)
        out = []
        for name in db.get_services():
            if name in SKIP_SERVICES:
                continue
            for m in pool.FindServiceByName(name).methods:
                out.append(Method(f"/{name}/{m.name}", message_factory.GetMessageClass(m.input_type),
                                  message_factory.GetMessageClass(m.output_type), m.server_streaming))
    return out


def _string(rng: random.Random, big: bool) -> str:
    if big and rng.random() < 0.1:
        return "a" * MB
    if rng.random() < 0.5:
        return rng.choice(STRINGS)
    return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 40)))


def _bytes(rng: random.Random, big: bool) -> bytes:
    if big and rng.random() < 0.1:
        return b"\x00" * MB
    return rng.randbytes(rng.choice((0, 1, 3, 4, 7, 8, 16, 64, 4096)))


def scalar(field, rng: random.Random, big: bool):
    t = field.type
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return rng.choice(FLOATS) if rng.random() < 0.7 else rng.uniform(-100, 100)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return rng.choice(INT32) if rng.random() < 0.7 else rng.randint(-1000, 1000)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice(INT64) if rng.random() < 0.7 else rng.randint(-1000, 1000)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32, F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice(UINT)
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        return _string(rng, big)
    if t == F.TYPE_BYTES:
        return _bytes(rng, big)
    if t == F.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return rng.choice(values + [999, -1])
    raise AssertionError(f"unexpected field type {t}")


def fill(msg, rng: random.Random, depth: int = 0, big: bool = True) -> None:
    """Set a random subset of `msg`'s fields to random and boundary values (in place)."""
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        is_msg = field.type == F.TYPE_MESSAGE
        if is_msg and field.message_type.GetOptions().map_entry:
            target = getattr(msg, field.name)
            for _ in range(rng.choice((0, 1, 3))):
                target[_string(rng, False)] = _string(rng, False)
            continue
        if field.is_repeated:
            target = getattr(msg, field.name)
            if is_msg:
                for _ in range(rng.choice(MESSAGE_REPEAT) if depth < 2 else rng.choice((0, 1))):
                    fill(target.add(), rng, depth + 1, big=False)
            else:
                n = rng.choice(SCALAR_REPEAT)
                target.extend(scalar(field, rng, False) for _ in range(n))
        elif is_msg:
            if depth < 3:
                fill(getattr(msg, field.name), rng, depth + 1, big)
            else:
                getattr(msg, field.name).SetInParent()
        else:
            setattr(msg, field.name, scalar(field, rng, big))


def messages(cls: type, rng: random.Random, count: int) -> Iterator:
    """The empty message, then `count` random ones."""
    yield cls()
    for _ in range(count):
        msg = cls()
        fill(msg, rng)
        yield msg


def mutate(seed, rng: random.Random):
    """A copy of the valid `seed` with one field, anywhere in it, set to a random or boundary value
    (or one repeated field made long or empty): it reaches the checks past the first field."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    target = msg
    while True:
        field = rng.choice(target.DESCRIPTOR.fields)
        if field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            if field.is_repeated:
                items = getattr(target, field.name)
                if items and rng.random() < 0.7:
                    target = rng.choice(items)
                    continue
                fill(items.add(), rng, 1, big=False)
                return msg
            if rng.random() < 0.7:
                target = getattr(target, field.name)
                continue
        break
    if field.type == F.TYPE_MESSAGE:  # a map, or a message replaced by a random one
        msg2 = getattr(target, field.name)
        if field.message_type.GetOptions().map_entry:
            msg2[_string(rng, False)] = _string(rng, True)
        else:
            msg2.Clear()
            fill(msg2, rng, 1)
    elif field.is_repeated:
        items = getattr(target, field.name)
        del items[:]
        items.extend(scalar(field, rng, False) for _ in range(rng.choice(SCALAR_REPEAT)))
    else:
        setattr(target, field.name, scalar(field, rng, True))
    return msg
