"""Poison checks for records read from Redis: decode, fields, dtypes, shapes, values.

A record that fails raises `PoisonRecord(reason, detail)`; the buffer moves it to the
dead-letter stream instead of handing it to a consumer. Only protobuf parsing and
numpy views of the raw tensor bytes are used (no torch import, never pickle).

Notation: P prompt tokens, T response tokens.
"""
from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import DecodeError

from instructrl.v1 import common_pb2, experience_pb2

# Values of the `reason` label of instructrl_buffer_dead_letters_total.
REASONS = ("decode", "missing_field", "dtype", "shape", "non_finite", "range", "max_deliveries")

_INT = {"INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}
_FLOAT = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "FP16": np.dtype("<f2"), "BF16": None}
LOGPROB_TOLERANCE = 1e-3  # a log-probability above this (p > 1) is corrupt


class PoisonRecord(ValueError):
    """A record that must not reach training. `reason` is a short label (see REASONS)."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _array(msg: common_pb2.Tensor, name: str, allowed: dict) -> np.ndarray:
    """A read-only 1-D numpy view of `msg` (BF16 widened to FP32), or PoisonRecord."""
    if msg.datatype not in allowed:
        raise PoisonRecord("dtype", f"{name} is {msg.datatype or 'unset'}, expected {sorted(allowed)}")
    if len(msg.shape) != 1:
        raise PoisonRecord("shape", f"{name} has shape {list(msg.shape)}, expected 1-D")
    n = int(msg.shape[0])
    dt = allowed[msg.datatype]
    itemsize = 2 if dt is None else dt.itemsize
    if n < 0 or len(msg.raw_data) != n * itemsize:
        raise PoisonRecord(
            "shape", f"{name}{list(msg.shape)} needs {max(n, 0) * itemsize} bytes, has {len(msg.raw_data)}")
    if dt is None:  # BF16: the high half of an FP32
        words = np.frombuffer(msg.raw_data, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32)
    return np.frombuffer(msg.raw_data, dtype=dt)


def check_experience(raw: bytes) -> experience_pb2.Experience:
    """Parse and validate one serialized `Experience`.

    Checks: it parses; sample_id and the four tensors are set; token ids are INT32/INT64
    and non-negative, log-probs are floats; all are 1-D with byte counts matching their
    shapes; T >= 1 and response_token_ids (T,), sampling_logprobs (T,), ref_logprobs (T,)
    agree; log-probs and scores are finite and log-probs <= 0 (within LOGPROB_TOLERANCE).
    """
    exp = experience_pb2.Experience()
    try:
        exp.ParseFromString(raw)
    except (DecodeError, TypeError, ValueError) as err:
        raise PoisonRecord("decode", f"not an Experience message ({err})") from None
    if not exp.sample_id:
        raise PoisonRecord("missing_field", "sample_id is empty")
    for name in ("prompt_token_ids", "response_token_ids", "sampling_logprobs", "ref_logprobs"):
        if not exp.HasField(name):
            raise PoisonRecord("missing_field", f"{name} is not set")
    prompt = _array(exp.prompt_token_ids, "prompt_token_ids", _INT)
    response = _array(exp.response_token_ids, "response_token_ids", _INT)
    sampling = _array(exp.sampling_logprobs, "sampling_logprobs", _FLOAT)
    ref = _array(exp.ref_logprobs, "ref_logprobs", _FLOAT)
    if response.size == 0:
        raise PoisonRecord("shape", "empty response (T = 0)")
    if not response.size == sampling.size == ref.size:
        raise PoisonRecord(
            "shape", f"response_token_ids ({response.size},), sampling_logprobs ({sampling.size},)"
            f" and ref_logprobs ({ref.size},) must have the same T")
    for name, lp in (("sampling_logprobs", sampling), ("ref_logprobs", ref)):
        if not np.isfinite(lp).all():
            raise PoisonRecord("non_finite", f"{name} has NaN or inf")
        if lp.max() > LOGPROB_TOLERANCE:
            raise PoisonRecord("range", f"{name} has a log-probability {float(lp.max()):.4g} > 0")
    if not (math.isfinite(exp.score) and math.isfinite(exp.raw_score)):
        raise PoisonRecord("non_finite", f"score {exp.score} / raw_score {exp.raw_score}")
    if (prompt.size and prompt.min() < 0) or response.min() < 0:
        raise PoisonRecord("range", "negative token id")
    return exp


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
