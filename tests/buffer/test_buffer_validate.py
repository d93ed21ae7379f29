"""Poison checks on serialized records (no Redis)."""
import numpy as np
import pytest
from buffer_records import make_experience, poison_records, tensor

from instructrl.buffer import PoisonRecord, check_experience, check_prompt
from instructrl.v1 import common_pb2, experience_pb2


def test_valid_record_passes_and_round_trips():
    rec = make_experience("p1/e0/s0", version=3)
    out = check_experience(rec.SerializeToString())
    assert out == rec


@pytest.mark.parametrize("name", list(poison_records()))
def test_poison_records_are_rejected_with_their_reason(name):
    raw = poison_records()[name]
    with pytest.raises(PoisonRecord) as err:
        check_experience(raw)
    assert err.value.reason == name.split(":")[0]


@pytest.mark.parametrize("field,arr,datatype", [
    ("sampling_logprobs", -np.ones(16, dtype="<f8"), "FP64"),
    ("ref_logprobs", (np.full(16, -1.0, dtype="<f4").view("<u4") >> 16).astype("<u2"), "BF16"),
    ("ref_logprobs", -np.ones(16, dtype="<f2"), "FP16"),
    ("response_token_ids", np.ones(16, dtype="<i8"), "INT64"),
    ("prompt_token_ids", np.ones(8, dtype="<i4"), ""),
])
def test_only_the_one_per_token_encoding_is_accepted(field, arr, datatype):
    """Token ids are INT32 and log-probs FP32 (what every producer writes); nothing else passes."""
    rec = make_experience("other-dtype")
    getattr(rec, field).CopyFrom(tensor(arr, datatype))
    with pytest.raises(PoisonRecord, match="dtype") as err:
        check_experience(rec.SerializeToString())
    assert field in str(err.value)


def test_nan_score_and_empty_response_are_poison():
    rec = make_experience("s")
    rec.score = float("inf")
    with pytest.raises(PoisonRecord, match="non_finite"):
        check_experience(rec.SerializeToString())
    rec = make_experience("s", T=0)
    with pytest.raises(PoisonRecord, match="shape"):
        check_experience(rec.SerializeToString())


def test_prompt_checks():
    ok = experience_pb2.PromptRecord(prompt_id="p", prompt=common_pb2.Sequence(text="hi"))
    assert check_prompt(ok.SerializeToString()).prompt.text == "hi"
    with pytest.raises(PoisonRecord, match="missing_field"):
        check_prompt(experience_pb2.PromptRecord(prompt_id="p").SerializeToString())
    with pytest.raises(PoisonRecord, match="decode"):
        check_prompt(b"\x0f\x01")
