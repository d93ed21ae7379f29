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


def test_bf16_and_fp64_log_probs_are_accepted_and_checked():
    rec = make_experience("bf16")
    bits = (np.full(16, -1.0, dtype="<f4").view("<u4") >> 16).astype("<u2")
    rec.sampling_logprobs.CopyFrom(tensor(bits, "BF16"))
    rec.ref_logprobs.CopyFrom(tensor(-np.ones(16, dtype="<f8"), "FP64"))
    check_experience(rec.SerializeToString())
    bits[0] = 0x7FC0  # BF16 NaN
    rec.sampling_logprobs.CopyFrom(tensor(bits, "BF16"))
    with pytest.raises(PoisonRecord, match="non_finite"):
        check_experience(rec.SerializeToString())


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
