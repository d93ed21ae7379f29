"""Poison checks for records read from Redis: decode, fields, dtypes, shapes, values.

A record that fails gets `PoisonRecord(reason, detail)`; the buffer moves it to the
dead-letter stream instead of handing it to a consumer. Only protobuf parsing and numpy
views of the raw tensor bytes are used (no torch import, never pickle).

Per-token data has one encoding (`instructrl.codec`): token ids INT32, log-probs FP32,
both 1-D. That is what producers write and all this accepts.

`screen_experiences` checks a whole batch: structure per record, values (finite, ranges)
once over the batch's concatenated tensors, and per record only when that finds a bad one.

Notation: P prompt tokens, T response tokens.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
from google.protobuf.message import DecodeError

from instructrl.codec import LOGPROB_DATATYPE, TOKEN_DATATYPE
from instructrl.v1 import common_pb2, experience_pb2

# Values of the `reason` label of instructrl_buffer_dead_letters_total.
REASONS = ("decode", "missing_field", "dtype", "shape", "non_finite", "range", "max_deliveries", "temperature",
           "failed")  # failed: a prompt whose work failed for good, delivered max_deliveries times

_TOKENS = ("prompt_token_ids", "response_token_ids")
_LOGPROBS = ("sampling_logprobs", "ref_logprobs")
_TOKEN_NP, _LOGPROB_NP = np.dtype("<i4"), np.dtype("<f4")  # 4 bytes each
LOGPROB_TOLERANCE = 1e-3  # a log-probability above this (p > 1) is corrupt


class PoisonRecord(ValueError):
    """A record that must not reach training. `reason` is a short label (see REASONS)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _tensor(msg: common_pb2.Tensor, name: str, datatype: str) -> tuple[bytes, int]:
    """(raw bytes, length) of a 1-D `datatype` tensor whose bytes match its shape."""
    shape, data = list(msg.shape), msg.raw_data  # each read copies once
    if msg.datatype != datatype:
        raise PoisonRecord("dtype", f"{name} is {msg.datatype or 'unset'}, expected {datatype}")
    if len(shape) != 1:
        raise PoisonRecord("shape", f"{name} has shape {shape}, expected 1-D")
    if shape[0] < 0 or len(data) != shape[0] * 4:
        raise PoisonRecord("shape", f"{name}{shape} needs {max(shape[0], 0) * 4} bytes, has {len(data)}")
    return data, shape[0]


def _parse(raw: bytes) -> experience_pb2.Experience:
    exp = experience_pb2.Experience()
    try:
        exp.ParseFromString(raw)
    except (DecodeError, TypeError, ValueError) as err:
        raise PoisonRecord("decode", f"not an Experience message ({err})") from None
    return exp


def _explain_structure(exp: experience_pb2.Experience) -> NoReturn:
    """Raise the PoisonRecord that says what is wrong with a record's fields."""
    if not exp.sample_id:
        raise PoisonRecord("missing_field", "sample_id is empty")
    lengths = {}
    for names, datatype in ((_TOKENS, TOKEN_DATATYPE), (_LOGPROBS, LOGPROB_DATATYPE)):
        for name in names:
            if not exp.HasField(name):
                raise PoisonRecord("missing_field", f"{name} is not set")
            lengths[name] = _tensor(getattr(exp, name), name, datatype)[1]
    t = lengths["response_token_ids"]
    if t == 0:
        raise PoisonRecord("shape", "empty response (T = 0)")
    if not t == lengths["sampling_logprobs"] == lengths["ref_logprobs"]:
        raise PoisonRecord(
            "shape", f"response_token_ids ({t},), sampling_logprobs ({lengths['sampling_logprobs']},)"
            f" and ref_logprobs ({lengths['ref_logprobs']},) must have the same T")
    if not (math.isfinite(exp.score) and math.isfinite(exp.raw_score)):
        raise PoisonRecord("non_finite", f"score {exp.score} / raw_score {exp.raw_score}")
    if not (math.isfinite(exp.temperature) and exp.temperature >= 0):
        raise PoisonRecord("range", f"temperature {exp.temperature} is not a finite number >= 0")
    raise AssertionError("_explain_structure called on a well-formed record")


def _structure(raw: bytes) -> tuple[experience_pb2.Experience, tuple[bytes, bytes, bytes, bytes]]:
    """Parse and check everything but tensor values; returns the record and the raw bytes of
    its tensors in the order prompt, response, sampling, ref. The fast path reads each field
    once; any doubt goes to `_explain_structure` for the reason."""
    exp = _parse(raw)
    p, r, s, f = exp.prompt_token_ids, exp.response_token_ids, exp.sampling_logprobs, exp.ref_logprobs
    ps, rs, ss, fs = p.shape, r.shape, s.shape, f.shape
    if (exp.sample_id and p.datatype == r.datatype == TOKEN_DATATYPE
            and s.datatype == f.datatype == LOGPROB_DATATYPE
            and len(ps) == len(rs) == len(ss) == len(fs) == 1):
        t = rs[0]
        pb, rb, sb, fb = p.raw_data, r.raw_data, s.raw_data, f.raw_data
        if (t > 0 and ss[0] == t and fs[0] == t and ps[0] >= 0
                and len(pb) == ps[0] * 4 and len(rb) == len(sb) == len(fb) == t * 4
                and math.isfinite(exp.score) and math.isfinite(exp.raw_score)
                and math.isfinite(exp.temperature) and exp.temperature >= 0):
            return exp, (pb, rb, sb, fb)
    _explain_structure(exp)


def _values_ok(token_bytes: bytes, logprob_bytes: bytes) -> bool:
    """True when every token id is >= 0 and every log-prob finite and <= 0 (within the
    tolerance). One reduction each way: min() is NaN or -inf, or max() NaN or > tolerance,
    exactly when some log-prob is bad."""
    ids = np.frombuffer(token_bytes, dtype=_TOKEN_NP)
    if ids.size and ids.min() < 0:
        return False
    lps = np.frombuffer(logprob_bytes, dtype=_LOGPROB_NP)
    return not lps.size or (math.isfinite(lps.min()) and lps.max() <= LOGPROB_TOLERANCE)


def _explain(tensors: tuple[bytes, bytes, bytes, bytes]) -> None:
    """Raise the PoisonRecord of the first bad tensor value of one record."""
    for name, data in zip(_TOKENS, tensors[:2], strict=True):
        ids = np.frombuffer(data, dtype=_TOKEN_NP)
        if ids.size and ids.min() < 0:
            raise PoisonRecord("range", f"{name} has a negative token id")
    for name, data in zip(_LOGPROBS, tensors[2:], strict=True):
        lps = np.frombuffer(data, dtype=_LOGPROB_NP)
        if not np.isfinite(lps).all():
            raise PoisonRecord("non_finite", f"{name} has NaN or inf")
        if lps.size and lps.max() > LOGPROB_TOLERANCE:
            raise PoisonRecord("range", f"{name} has a log-probability {float(lps.max()):.4g} > 0")


def screen_experiences(raws: Sequence[bytes]) -> list[experience_pb2.Experience | PoisonRecord]:
    """Check serialized `Experience` records; one record or PoisonRecord per input.

    Checks: it parses; sample_id and the four tensors are set; token ids are INT32 and
    >= 0; log-probs are FP32, finite and <= 0 (within LOGPROB_TOLERANCE); all are 1-D
    with byte counts matching their shapes; T >= 1 and response_token_ids (T,),
    sampling_logprobs (T,), ref_logprobs (T,) agree; scores are finite; the temperature is
    finite and >= 0 (0 = unset).
    """
    out: list = []
    parts: list = []
    token_chunks: list[bytes] = []
    logprob_chunks: list[bytes] = []
    for raw in raws:
        try:
            exp, tensors = _structure(raw)
        except PoisonRecord as err:
            out.append(err)
            parts.append(None)
            continue
        out.append(exp)
        parts.append(tensors)
        token_chunks += tensors[:2]
        logprob_chunks += tensors[2:]
    if not _values_ok(b"".join(token_chunks), b"".join(logprob_chunks)):  # rare: find the bad records
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
