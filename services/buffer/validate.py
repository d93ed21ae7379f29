"""Poison checks for records read from Redis: decode, fields, dtypes, shapes, values.

A record that fails gets `PoisonRecord(reason, detail)`; the buffer moves it to the
dead-letter stream instead of handing it to a consumer. Only protobuf parsing and numpy
views of the raw tensor bytes are used (no torch import, never pickle).

`screen_experiences` checks a whole batch: structure per record, values (finite, ranges)
once over the batch's concatenated tensors, and per record only when that finds a bad one.

Notation: P prompt tokens, T response tokens.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError

from instructrl.v1 import common_pb2, experience_pb2

# Values of the `reason` label of instructrl_buffer_dead_letters_total.
REASONS = ("decode", "missing_field", "dtype", "shape", "non_finite", "range", "max_deliveries")

_INT = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_FLOAT = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"), "BF16": None}
_SIZE = {"INT32": 4, "INT64": 8, "FP32": 4, "FP64": 8, "FP16": 2, "BF16": 2}
_TOKENS = ("prompt_token_ids", "response_token_ids")
_LOGPROBS = ("sampling_logprobs", "ref_logprobs")
LOGPROB_TOLERANCE = 1e-3  # a log-probability above this (p > 1) is corrupt


class PoisonRecord(ValueError):
    """A record that must not reach training. `reason` is a short label (see REASONS)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _view(datatype: str, data: bytes) -> np.ndarray:
    """A numpy view of raw little-endian bytes (BF16 widened to FP32)."""
    dt = _INT.get(datatype) or _FLOAT[datatype]
    if dt is None:  # BF16: the high half of an FP32
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=dt)


def _tensor(msg: common_pb2.Tensor, name: str, allowed: dict) -> tuple[str, bytes, int]:
    """(datatype, raw bytes, length) of a 1-D tensor whose bytes match its shape."""
    datatype, shape, data = msg.datatype, list(msg.shape), msg.raw_data  # each read copies once
    if datatype not in allowed:
        raise PoisonRecord("dtype", f"{name} is {datatype or 'unset'}, expected {sorted(allowed)}")
    if len(shape) != 1:
        raise PoisonRecord("shape", f"{name} has shape {shape}, expected 1-D")
    itemsize = 2 if allowed[datatype] is None else allowed[datatype].itemsize
    if shape[0] < 0 or len(data) != shape[0] * itemsize:
        raise PoisonRecord(
            "shape", f"{name}{shape} needs {max(shape[0], 0) * itemsize} bytes, has {len(data)}")
    return datatype, data, shape[0]


def _parse(raw: bytes) -> experience_pb2.Experience:
    exp = experience_pb2.Experience()
    try:
        exp.ParseFromString(raw)
    except (DecodeError, TypeError, ValueError) as err:
        raise PoisonRecord("decode", f"not an Experience message ({err})") from None
    return exp


def _explain_structure(exp: experience_pb2.Experience) -> None:
    """Raise the PoisonRecord that says what is wrong with a record's fields."""
    if not exp.sample_id:
        raise PoisonRecord("missing_field", "sample_id is empty")
    lengths = {}
    for names, allowed in ((_TOKENS, _INT), (_LOGPROBS, _FLOAT)):
        for name in names:
            if not exp.HasField(name):
                raise PoisonRecord("missing_field", f"{name} is not set")
            lengths[name] = _tensor(getattr(exp, name), name, allowed)[2]
    t = lengths["response_token_ids"]
    if t == 0:
        raise PoisonRecord("shape", "empty response (T = 0)")
    if not t == lengths["sampling_logprobs"] == lengths["ref_logprobs"]:
        raise PoisonRecord(
            "shape", f"response_token_ids ({t},), sampling_logprobs ({lengths['sampling_logprobs']},)"
            f" and ref_logprobs ({lengths['ref_logprobs']},) must have the same T")
    if not (math.isfinite(exp.score) and math.isfinite(exp.raw_score)):
        raise PoisonRecord("non_finite", f"score {exp.score} / raw_score {exp.raw_score}")
    raise AssertionError("_explain_structure called on a well-formed record")


def _structure(raw: bytes) -> tuple[experience_pb2.Experience, tuple]:
    """Parse and check everything but tensor values; returns the record and its tensors
    as ((datatype, bytes), ...) in the order prompt, response, sampling, ref. The fast
    path reads each field once; any doubt goes to `_explain_structure` for the reason."""
    exp = _parse(raw)
    p, r, s, f = exp.prompt_token_ids, exp.response_token_ids, exp.sampling_logprobs, exp.ref_logprobs
    pd, rd, sd, fd = p.datatype, r.datatype, s.datatype, f.datatype
    ps, rs, ss, fs = p.shape, r.shape, s.shape, f.shape
    if (exp.sample_id and pd in _INT and rd in _INT and sd in _FLOAT and fd in _FLOAT
            and len(ps) == len(rs) == len(ss) == len(fs) == 1):
        t = rs[0]
        pb, rb, sb, fb = p.raw_data, r.raw_data, s.raw_data, f.raw_data
        if (t > 0 and ss[0] == t and fs[0] == t and ps[0] >= 0
                and len(pb) == ps[0] * _SIZE[pd] and len(rb) == t * _SIZE[rd]
                and len(sb) == t * _SIZE[sd] and len(fb) == t * _SIZE[fd]
                and math.isfinite(exp.score) and math.isfinite(exp.raw_score)):
            return exp, ((pd, pb), (rd, rb), (sd, sb), (fd, fb))
    _explain_structure(exp)


def _values_ok(groups: dict[str, list[bytes]]) -> bool:
    """True when every token id is >= 0 and every log-prob finite and <= 0.
    Two reductions per float group: min() is NaN or -inf, or max() NaN or > tolerance,
    exactly when some value is bad."""
    for datatype, chunks in groups.items():
        arr = _view(datatype, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if arr.size == 0:
            continue
        if datatype in _INT:
            if arr.min() < 0:
                return False
        elif not (math.isfinite(arr.min()) and arr.max() <= LOGPROB_TOLERANCE):
            return False
    return True


def _explain(tensors: tuple) -> None:
    """Raise the PoisonRecord of the first bad tensor value of one record."""
    for name, (datatype, data) in zip(_TOKENS + _LOGPROBS, tensors):
        arr = _view(datatype, data)
        if arr.size == 0 or _values_ok({datatype: [data]}):
            continue
        if datatype in _INT:
            raise PoisonRecord("range", f"{name} has a negative token id")
        if not np.isfinite(arr).all():
            raise PoisonRecord("non_finite", f"{name} has NaN or inf")
        raise PoisonRecord("range", f"{name} has a log-probability {float(arr.max()):.4g} > 0")


def screen_experiences(raws: Sequence[bytes]) -> list[experience_pb2.Experience | PoisonRecord]:
    """Check serialized `Experience` records; one record or PoisonRecord per input.

    Checks: it parses; sample_id and the four tensors are set; token ids are INT32/INT64
    and >= 0; log-probs are FP32/FP64/FP16/BF16, finite and <= 0 (within
    LOGPROB_TOLERANCE); all are 1-D with byte counts matching their shapes; T >= 1 and
    response_token_ids (T,), sampling_logprobs (T,), ref_logprobs (T,) agree; scores are
    finite.
    """
    out: list = []
    parts: list = []
    groups: dict[str, list[bytes]] = defaultdict(list)
    for raw in raws:
        try:
            exp, tensors = _structure(raw)
        except PoisonRecord as err:
            out.append(err)
            parts.append(None)
            continue
        out.append(exp)
        parts.append(tensors)
        for datatype, data in tensors:
            groups[datatype].append(data)
    if not _values_ok(groups):  # rare: find which records are bad
        for i, tensors in enumerate(parts):
            if tensors is not None:
                try:
                    _explain(tensors)
                except PoisonRecord as err:
                    out[i] = err
    return out


def check_experience(raw: bytes) -> experience_pb2.Experience:
    """Parse and validate one serialized `Experience` (see `screen_experiences`)."""
    result = screen_experiences([raw])[0]
    if isinstance(result, PoisonRecord):
        raise result
    return result


def check_prompt(raw: bytes) -> experience_pb2.PromptRecord:
    """Parse and validate one serialized `PromptRecord` (prompt_id and a prompt are set)."""
    rec = experience_pb2.PromptRecord()
    try:
        rec.ParseFromString(raw)
    except (DecodeError, TypeError, ValueError) as err:
        raise PoisonRecord("decode", f"not a PromptRecord message ({err})") from None
    if not rec.prompt_id:
        raise PoisonRecord("missing_field", "prompt_id is empty")
    if rec.prompt.WhichOneof("kind") is None:
        raise PoisonRecord("missing_field", "prompt has neither text nor token_ids")
    return rec
