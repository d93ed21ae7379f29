"""Reward scorer (no transport): numerics vs transformers, batching invariance, validation, rules, norm."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from instructrl.config import ConfigError, load
from instructrl.reward.config import RewardConfig
from instructrl.reward.normalization import RunningNormalizer
from instructrl.reward.scorer import RuleReward, ScoreInput, import_rule, score
from instructrl.serving.errors import InvalidArgument

ATOL = 1e-5


def _examples(tok):
    return [
        ScoreInput("sort: 3 1 2 =>", " 1 2 3"),
        ScoreInput("copy: the quick brown fox", " the quick brown fox jumps over the lazy dog"),
        ScoreInput([5, 17, 42], [7]),
        ScoreInput("reverse: a b", [40, 41, 42, 43, 44, 45, 46, 47, 48]),
        ScoreInput("", "ok."),
        ScoreInput([3, 4], [9, tok.pad_token_id, 11, tok.pad_token_id]),  # pad id inside and at the end
    ]


def test_matches_sequence_classification_output_on_unpadded_input(reward_model_dir, reward_scorer):
    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = reward_scorer.tokenizer
    for x in _examples(tok)[:5]:  # no pad id inside: HF's own pad search reads the last token too
        ids = (tok.encode(x.prompt, add_special_tokens=False) if isinstance(x.prompt, str) else list(x.prompt)) + \
              (tok.encode(x.response, add_special_tokens=False) if isinstance(x.response, str) else list(x.response))
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, 0].item()
        assert score(reward_scorer, [x])[0] == pytest.approx(want, abs=ATOL)


def test_score_is_read_at_the_last_real_token_even_if_it_is_the_pad_id(reward_model_dir, reward_scorer):
    hf = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    x = _examples(reward_scorer.tokenizer)[-1]
    ids = list(x.prompt) + list(x.response)
    with torch.no_grad():
        per_token = hf.score(hf.model(torch.tensor([ids])).last_hidden_state)[0, :, 0]  # (L,)
    assert score(reward_scorer, [x])[0] == pytest.approx(per_token[-1].item(), abs=ATOL)


def test_batched_equals_unbatched(reward_scorer):
    xs = _examples(reward_scorer.tokenizer)
    batched = score(reward_scorer, xs, batched=True)
    single = score(reward_scorer, xs, batched=False)
    assert len(batched) == len(xs)
    for b, s in zip(batched, single, strict=True):
        assert b == pytest.approx(s, abs=ATOL)
    assert len({round(v, 4) for v in batched}) == len(xs)  # the scores do differ per input


def test_text_and_ids_are_the_same_input(reward_scorer):
    tok = reward_scorer.tokenizer
    p, r = "count the letters in hello =>", " 5"
    ids = ScoreInput(tok.encode(p, add_special_tokens=False), tok.encode(r, add_special_tokens=False))
    assert score(reward_scorer, [ScoreInput(p, r)]) == score(reward_scorer, [ids])


@pytest.mark.parametrize("items, match", [
    ([], r"items: empty"),
    ([ScoreInput("a", "b"), ScoreInput("a", "")], r"items\[1\]\.response: empty"),
    ([ScoreInput([1, 2], [])], r"items\[0\]\.response: empty"),
    ([ScoreInput([1, 300], [4])], r"items\[0\]\.prompt: token id 300 at position 1 .*\[0, 300\)"),
    ([ScoreInput("a", "b"), ScoreInput([1], [-1])], r"items\[1\]\.response: token id -1"),
    ([ScoreInput([5] * 100, [6] * 29)], r"items\[0\]: prompt\+response is 129 tokens, more than max_seq_len 128"),
])
def test_bad_inputs_name_item_and_field(reward_scorer, items, match):
    with pytest.raises(InvalidArgument, match=match):
        reward_scorer.prepare(items)


def test_running_normalisation_by_hand():
    n = RunningNormalizer()
    scores, st = n.apply([1.0, 2.0, 3.0])
    # mean 2, sample std sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1
    assert (st.mean, st.std, st.count) == (2.0, 1.0, 3)
    assert scores == [-1.0, 0.0, 1.0]
    scores, st = n.apply([4.0])
    # mean 2.5, std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    assert st.count == 4 and st.mean == pytest.approx(2.5) and st.std == pytest.approx(math.sqrt(5 / 3))
    assert scores[0] == pytest.approx(1.5 / math.sqrt(5 / 3))

    frozen = RunningNormalizer(freeze_after=3)
    frozen.apply([1.0, 2.0])
    scores, st = frozen.apply([3.0, 100.0])  # only 3.0 enters the statistics, then they freeze
    assert (st.mean, st.std, st.count) == (2.0, 1.0, 3)
    assert scores == [1.0, 98.0]
    assert frozen.apply([-50.0])[1] == st

    first = RunningNormalizer()
    assert first.apply([5.0]) == ([0.0], first.stats()) and first.std == 1.0  # std is 1 until n >= 2


def test_rule_via_import_path(reward_model_dir):
    cfg = RewardConfig(rule="instructrl.reward.rules:exact_match", tokenizer=str(reward_model_dir))
    rule = RuleReward(cfg)
    tok = rule.tokenizer
    xs = [ScoreInput("2+2=", " 4 ", {"answer": "4"}),
          ScoreInput("2+2=", "5", {"answer": "4"}),
          ScoreInput(tok.encode("sort: 3 1 2 =>"), tok.encode(" 1 2 3") + [tok.eos_token_id], {"answer": "1 2 3"})]
    assert score(rule, xs) == [1.0, 0.0, 1.0]  # ids decoded, special tokens skipped
    items, _ = rule.prepare([ScoreInput("q", "a", {})])
    (missing,) = rule.forward(items)
    assert isinstance(missing, ValueError) and "answer" in str(missing)
    no_tok = RuleReward(RewardConfig(rule="instructrl.reward.rules:exact_match"))
    with pytest.raises(InvalidArgument, match=r"items\[0\]\.prompt: token ids need a tokenizer"):
        no_tok.prepare([ScoreInput([1, 2], "x", {"answer": "x"})])
    with pytest.raises(InvalidArgument, match=r"items\[0\]\.response: empty"):
        no_tok.prepare([ScoreInput("q", "", {"answer": "x"})])


def test_rule_and_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot import"):
        import_rule("instructrl.no_such_module:f")
    with pytest.raises(ConfigError, match="not a callable"):
        import_rule("instructrl.reward.rules:no_such_function")
    assert import_rule("math:sqrt") is math.sqrt
    with pytest.raises(ConfigError, match="exactly one"):
        load(RewardConfig, None, ["model=/x", "rule=a.b:c"])
    with pytest.raises(ConfigError, match="exactly one"):
        load(RewardConfig, None, [])
    cfg = load(RewardConfig, None, ["rule=math:fabs", "batching.max_wait_ms=2", "normalization.enabled=true"])
    assert cfg.batching.max_wait_ms == 2.0 and cfg.normalization.enabled
    nan_rule = RuleReward(RewardConfig(rule="math:fabs"))
    nan_rule.fn = lambda p, r, m: float("nan")
    (out,) = nan_rule.forward([ScoreInput("a", "b", {})])
    assert isinstance(out, RuntimeError)
