"""Experience records for the buffer tests and the benchmark's shapes (P, T tokens)."""
from __future__ import annotations

import numpy as np

from instructrl.v1 import common_pb2, experience_pb2


def tensor(arr: np.ndarray, datatype: str) -> common_pb2.Tensor:
    return common_pb2.Tensor(datatype=datatype, shape=list(arr.shape), raw_data=arr.tobytes())


def make_experience(sample_id: str, version: int = 0, P: int = 8, T: int = 16,
                    seed: int = 0) -> experience_pb2.Experience:
    """A valid record: prompt (P,), response (T,), sampling and reference log-probs (T,)."""
    rng = np.random.default_rng(seed)
    return experience_pb2.Experience(
        sample_id=sample_id, prompt_id=sample_id.split("/")[0], finish_reason="stop",
        prompt_token_ids=tensor(rng.integers(0, 32000, P, dtype="<i4"), "INT32"),
        response_token_ids=tensor(rng.integers(0, 32000, T, dtype="<i4"), "INT32"),
        sampling_logprobs=tensor(-rng.random(T, dtype="<f4") * 5, "FP32"),
        ref_logprobs=tensor(-rng.random(T, dtype="<f4") * 5, "FP32"),
        policy_version=version, score=0.5, raw_score=1.25, run_id="test", replica_id="r0")


def poison_records() -> dict[str, bytes]:
    """Serialized records that must go to the dead-letter stream, by expected reason."""
    bad_shape = make_experience("bad-shape")
    bad_shape.ref_logprobs.CopyFrom(tensor(-np.ones(15, dtype="<f4"), "FP32"))
    nan = make_experience("nan")
    lp = -np.ones(16, dtype="<f4")
    lp[3] = np.nan
    nan.sampling_logprobs.CopyFrom(tensor(lp, "FP32"))
    bad_dtype = make_experience("bad-dtype")
    bad_dtype.response_token_ids.CopyFrom(tensor(np.zeros(16, dtype="<f4"), "FP32"))
    no_id = make_experience("")
    positive = make_experience("positive")
    positive.ref_logprobs.CopyFrom(tensor(np.full(16, 0.7, dtype="<f4"), "FP32"))
    short_bytes = make_experience("short-bytes")
    short_bytes.sampling_logprobs.raw_data = short_bytes.sampling_logprobs.raw_data[:-4]
    return {
        "decode": b"\x0f\x00garbage",  # field 1 with wire type 7: not protobuf
        "shape": bad_shape.SerializeToString(),
        "non_finite": nan.SerializeToString(),
        "dtype": bad_dtype.SerializeToString(),
        "missing_field": no_id.SerializeToString(),
        "range": positive.SerializeToString(),
        "shape:bytes": short_bytes.SerializeToString(),
    }
