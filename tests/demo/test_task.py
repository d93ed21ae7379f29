"""The synthetic task: answers, gold score, splits, demonstrations, noisy rankings."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from instructrl.demo import task as T


@pytest.mark.parametrize("prompt, expected", [
    ("reverse: c a b =>", " b a c"),
    ("sort: 3 1 2 =>", " 1 2 3"),
    ("sort: q b q a =>", " a b q q"),
    ("count: x y z q =>", " 4"),
    ("copy: d e =>", " d e"),
])
def test_answers(prompt, expected):
    assert T.answer(prompt) == expected
    assert T.gold_score(prompt, expected) == 1.0


@pytest.mark.parametrize("bad", ["", "reverse c a =>", "shout: a b =>", "sort: =>", "sort: a b"])
def test_parse_rejects_non_task_prompts(bad):
    with pytest.raises(ValueError, match="not a task prompt"):
        T.parse_prompt(bad)


def test_gold_score_by_hand():
    p = "reverse: c a b =>"  # answer b a c
    assert T.gold_score(p, " b a c ok") == pytest.approx(1 / 1.5)  # right, one filler word
    assert T.gold_score(p, " b a c ok done") == pytest.approx(1 / 2.0)
    assert T.gold_score(p, " a b c") == pytest.approx(0.6 * 1 / 3)  # swapped pair: only c in place
    assert T.gold_score(p, " b a") == pytest.approx(0.6 * 2 / 3)  # dropped the last item
    assert T.gold_score(p, " b b a c") == pytest.approx(0.6 * 1 / 3 / 1.5)  # duplicate: shifted, one extra
    assert T.gold_score(p, "") == 0.0
    assert T.gold_score(p, "b  a   c") == 1.0  # whitespace does not matter


def test_gold_score_stays_in_unit_interval():
    rng = random.Random(0)
    for p in T.make_prompts(300, seed=1):
        target = T.solve(*T.parse_prompt(p))
        for kind in T.CORRUPTIONS:
            g = T.gold_score(p, T.render(T.corrupt(rng, target, kind)))
            assert 0.0 <= g <= 1.0


def test_splits_are_disjoint_and_stable():
    train = set(T.make_prompts(3000, seed=0))
    held = set(T.make_prompts(300, seed=0, split="eval"))
    assert not train & held
    assert all(T.split_of(p) == "eval" for p in held)
    assert T.make_prompts(5, seed=7) == T.make_prompts(5, seed=7)


def test_demonstrations_carry_the_configured_share_of_mistakes():
    demos = T.make_demonstrations(2000, seed=0)
    imperfect = sum(T.gold_score(d["prompt"], d["response"]) < 1.0 for d in demos) / len(demos)
    assert 0.35 <= imperfect <= 0.45  # default imperfect_fraction 0.4
    clean = T.make_demonstrations(200, seed=0, cfg=T.TaskConfig(imperfect_fraction=0.0))
    assert all(d["response"] == T.answer(d["prompt"]) for d in clean)


def test_rankings_are_k_wise_best_first():
    recs = T.make_rankings(300, seed=0, cfg=T.TaskConfig(num_responses=5))
    assert all(len(r["responses"]) == 5 and set(r) == {"prompt", "responses"} for r in recs)
    assert sum(len(set(r["responses"])) == 5 for r in recs) / len(recs) > 0.95  # distinct candidates
    exact = T.make_rankings(200, seed=0, cfg=T.TaskConfig(labeler_noise=0.0))
    for r in exact:
        g = [T.gold_score(r["prompt"], x) for x in r["responses"]]
        assert g == sorted(g, reverse=True)
    noisy = T.gold_ranking_accuracy(T.make_rankings(1000, seed=0))
    assert 0.7 < noisy < 0.9  # the labeler is informative but not the gold score


def test_default_labelers_agree_like_instructgpt_labelers():
    # InstructGPT: training labelers agree with each other on 72.6 +- 1.5% of comparisons
    assert 0.70 <= T.labeler_agreement(3000, seed=0) <= 0.76
    assert T.labeler_agreement(500, seed=0, noise=0.0) > 0.95  # only exact ties disagree


def test_pairs_prefer_better_responses_on_average():
    pairs = T.make_pairs(1000, seed=0)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    better = sum(T.gold_score(p["prompt"], p["chosen"]) > T.gold_score(p["prompt"], p["rejected"]) for p in pairs)
    assert better / len(pairs) > 0.65


def test_tokenizer_corpus_covers_the_vocabulary():
    text = " ".join(T.tokenizer_corpus(n=50))
    for word in list(T.TASKS) + list(T.LETTERS) + list(T.DIGITS) + list(T.FILLER) + [T.ARROW]:
        assert f" {word}" in text or text.startswith(word), word


def test_write_jsonl_round_trips_and_is_atomic(tmp_path):
    path = tmp_path / "d" / "x.jsonl"
    T.write_jsonl(path, [{"prompt": "a", "response": "b"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"prompt": "a", "response": "b"}]

    def broken():
        yield {"prompt": "c"}
        raise RuntimeError("labeler crashed")

    with pytest.raises(RuntimeError):
        T.write_jsonl(path, broken())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"prompt": "a", "response": "b"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.jsonl"]


def test_task_module_is_pure_python():
    code = "import sys, instructrl.demo.task; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
