"""JSONL validation (errors name FILE:LINE and the field), tokenisation and collation."""
from __future__ import annotations

import json

import pytest
import torch

from instructrl.offline import data as D


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"prompt": "sort: 2 1 =>", "responses": [" 1 2", " 2 1"]}


@pytest.mark.parametrize("bad_line, reader, message", [
    ('{"prompt": "x", ', D.read_rankings, r":2: not valid JSON"),
    ("[1, 2]", D.read_rankings, r":2: expected a JSON object, got list"),
    ({"responses": [" a", " b"]}, D.read_rankings, r":2: field 'prompt': missing"),
    ({"prompt": 3, "responses": [" a", " b"]}, D.read_rankings, r":2: field 'prompt': expected a string, got int"),
    ({"prompt": "p"}, D.read_rankings, r":2: field 'responses': missing"),
    ({"prompt": "p", "responses": [" a"]}, D.read_rankings, r":2: field 'responses': K = 1 responses; need 2 to 9"),
    ({"prompt": "p", "responses": [f" {i}" for i in range(10)]}, D.read_rankings,
     r":2: field 'responses': K = 10 responses; need 2 to 9"),
    ({"prompt": "p", "responses": " a b"}, D.read_rankings, r":2: field 'responses': expected a list"),
    ({"prompt": "p", "responses": [" a", 7]}, D.read_rankings,
     r":2: field 'responses\[1\]': expected a string, got int"),
    ({"prompt": "p", "responses": [" a", " b"], "chosen": " a"}, D.read_rankings,
     r":2: field 'responses': give either"),
    ({"prompt": "p", "chosen": " a"}, D.read_pairs, r":2: field 'rejected': missing"),
    ({"prompt": "p", "response": None}, D.read_demonstrations,
     r":2: field 'response': expected a string, got NoneType"),
    ({"prompt": "", "response": " a"}, D.read_demonstrations, r":2: field 'prompt': empty"),
])
def test_errors_name_file_line_and_field(tmp_path, bad_line, reader, message):
    first = GOOD if reader is not D.read_demonstrations else {"prompt": "p", "response": " a"}
    path = _write(tmp_path / "bad.jsonl", [first, bad_line, first])
    with pytest.raises(D.DataError, match=f"^{path}{message}"):
        reader(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(D.DataError, match="no such file"):
        D.read_demonstrations(tmp_path / "nope.jsonl")
    with pytest.raises(D.DataError, match="no records"):
        D.read_rankings(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_formats_accepted(tmp_path):
    path = _write(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": [" a", " b", " c"], "id": 7},  # extra keys are ignored
        "",  # blank lines are skipped
        {"prompt": "q", "chosen": " x", "rejected": " y"},
    ])
    assert D.read_rankings(path) == [D.Ranking("p", (" a", " b", " c")), D.Ranking("q", (" x", " y"))]
    # DPO: a ranking of K gives its C(K,2) (better, worse) pairs
    assert D.read_pairs(path) == [D.Pair("p", " a", " b"), D.Pair("p", " a", " c"), D.Pair("p", " b", " c"),
                                  D.Pair("q", " x", " y")]


def test_sft_labels_mask_the_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    e = D.encode_pair(tok, "reverse: c a b =>", " b a c", max_length=64, append_eos=True)
    prompt_ids = tok("reverse: c a b =>", add_special_tokens=False)["input_ids"]
    response_ids = tok(" b a c", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(prompt_ids) == ["reverse", ":", "Ġc", "Ġa", "Ġb", "Ġ=>"]
    assert e.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert e.labels == [-100] * 6 + response_ids + [tok.eos_token_id]
    assert tok.bos_token_id not in e.input_ids  # no special tokens added
    cut = D.encode_pair(tok, "reverse: c a b =>", " b a c", max_length=8, append_eos=True)
    assert cut.truncated and len(cut.input_ids) == 8 and cut.labels[6:] == response_ids[:2]


def test_collate_right_pads():
    a = D.Encoded([5, 6, 7], [-100, 6, 7], False)
    b = D.Encoded([5, 8], [-100, 8], False)
    batch = D.collate_sequences([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 8, -100]]
    assert batch["last_index"].tolist() == [2, 1]


def test_kwise_batch_keeps_each_prompt_in_one_element():
    e = lambda *ids: D.Encoded(list(ids), [-100] * len(ids), False)  # noqa: E731
    batch = D.collate_rankings([[e(1, 2), e(1, 3)], [e(4, 5), e(4, 6, 6), e(4, 7), e(4, 8)]], pad_id=0)
    assert batch["input_ids"].shape == (6, 3)  # only the 2 + 4 real sequences are run
    assert batch["num_responses"].tolist() == [2, 4]
    assert batch["prompt_index"].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 0, 1, 2, 3]
    scores = torch.tensor([10.0, 11.0, 20.0, 21.0, 22.0, 23.0], requires_grad=True)
    rewards = D.scatter_rewards(scores, batch["prompt_index"], batch["rank"], 2)
    assert rewards.tolist() == [[10.0, 11.0, 0.0, 0.0], [20.0, 21.0, 22.0, 23.0]]
    rewards.sum().backward()
    assert scores.grad.tolist() == [1.0] * 6


def test_batch_indices_cover_each_example_once_per_epoch():
    seen = [i for b in D.batch_indices(10, 3, epoch=0, seed=1) for i in b]
    assert sorted(seen) == list(range(10))
    assert D.batch_indices(10, 3, epoch=1, seed=1) != D.batch_indices(10, 3, epoch=0, seed=1)
    r0 = D.batch_indices(10, 2, 0, 1, rank=0, world=2)
    r1 = D.batch_indices(10, 2, 0, 1, rank=1, world=2)
    assert len(r0) == len(r1)  # every rank takes the same number of steps
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}


def test_holdout_split_is_seeded_and_disjoint():
    train, held = D.split_holdout(list(range(100)), 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert D.split_holdout(list(range(100)), 0.1, seed=3) == (train, held)
    assert D.split_holdout(list(range(5)), 0.05, seed=3) == (list(range(5)), [])
