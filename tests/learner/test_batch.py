"""Records -> padded tensors: shapes, the position convention, padding invariance; ptx; config."""
from __future__ import annotations

import pytest
import torch
from learner_testkit import build_tiny, experience, random_records
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructrl.config import ConfigError, load
from instructrl.learner.batch import broadcast_batch, from_records
from instructrl.learner.config import LearnerConfig
from instructrl.learner.models import load_critic, policy_forward, value_forward
from instructrl.learner.ptx import PtxData
from instructrl.learner.update import loss_divisor
from instructrl.rl import policy_loss


def test_from_records_layout():
    recs = [experience("a/e0/s0", [5, 6, 7], [8, 9], [-0.5, -0.25], [-1.0, -2.0], 1.5, 3),
            experience("b/e0/s0", [10], [11, 12, 13], [-0.1, -0.2, -0.3], [-0.4, -0.5, -0.6], -1.0, 4)]
    b = from_records(recs, [1, 0], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # logits at position P + t - 1 predict response token t
    assert b.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert b.response_ids.tolist() == [[8, 9, 0], [11, 12, 13]]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.sampling_logprobs.tolist() == [[-0.5, -0.25, 0.0], pytest.approx([-0.1, -0.2, -0.3])]
    assert b.ref_logprobs[1].tolist() == pytest.approx([-0.4, -0.5, -0.6])
    assert b.scores.tolist() == [1.5, -1.0] and b.lags.tolist() == [1, 0] and b.num_tokens == 5
    assert b.rows(torch.tensor([1])).input_ids.tolist() == [[10, 11, 12, 13, 0]]
    same, flags, path = broadcast_batch(b, {"stop": 0, "save": 1, "sync": 0}, "x")  # a world of one
    assert torch.equal(same.input_ids, b.input_ids) and flags["save"] == 1 and path == "x"
    with pytest.raises(ValueError):
        from_records([experience("c/e0/s0", [], [1], [-1.0], [-1.0], 0.0, 0)], [0], pad_id=0)


def test_padded_batch_matches_each_record_alone(tmp_path):
    """Right padding and the gather at `positions` give each record's own log-probs and values."""
    model_dir = build_tiny(tmp_path / "m")
    actor = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    critic = load_critic("", model_dir)
    torch.nn.init.normal_(critic.seq_cls.score.weight)  # a non-zero head, so values mean something
    recs = random_records(5, vocab=300, seed=0)
    for rec in recs:
        rec.temperature = 0.7  # the sampling temperature each record carries
    batch = from_records(recs, [0] * 5, pad_id=0)
    with torch.no_grad():
        logprobs, logits = policy_forward(actor, batch)
        values = value_forward(critic, batch)
        for i, rec in enumerate(recs):
            alone = from_records([rec], [0], pad_id=0)
            lp, _ = policy_forward(actor, alone)
            T = alone.num_tokens
            torch.testing.assert_close(logprobs[i, :T], lp[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[i, :T], value_forward(critic, alone)[0], atol=1e-5, rtol=1e-5)
            # against a direct computation: log softmax(logits[P + t - 1] / temp)[token]
            ids = batch.input_ids[i:i + 1, :alone.input_ids.shape[1]]
            direct = torch.log_softmax(actor(input_ids=ids).logits[0] / 0.7, -1)
            P = len(rec.prompt_token_ids.raw_data) // 4
            want = torch.stack([direct[P + t - 1, ids[0, P + t]] for t in range(T)])
            torch.testing.assert_close(lp[0], want, atol=1e-5, rtol=1e-5)


def test_micro_batch_losses_sum_to_the_minibatch_loss():
    """`loss_divisor`: W ranks x G micro-batches, averaged as DeepSpeed does, give the token mean."""
    g = torch.Generator().manual_seed(0)
    B, T, W, G = 8, 5, 2, 2
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)).float()
    lp, old, adv = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    full, _ = policy_loss(lp, old, adv, mask, 0.2)
    div = loss_divisor(int(mask.sum()), W, G)
    parts = [policy_loss(lp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, num_tokens=div)[0]
             for i in range(0, B, 2)]
    torch.testing.assert_close(sum(parts) / (W * G), full)  # DeepSpeed: / G per rank, mean over W ranks


def test_ptx_batches_are_disjoint_per_rank_and_resumable(tmp_path):
    model_dir = build_tiny(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = tmp_path / "pretrain.txt"
    data.write_text("\n".join(f"document number {i} says hello" for i in range(10)))
    r0, r1 = (PtxData(str(data), tok, 2, 32, seed=0, rank=r, world=2) for r in (0, 1))
    ids0, mask0, labels0 = r0.next_batch()
    ids1, _, _ = r1.next_batch()
    assert ids0.shape[0] == 2 and (labels0 == -100).eq(mask0 == 0).all()
    assert not {tuple(x) for x in ids0.tolist()} & {tuple(x) for x in ids1.tolist()}
    again = PtxData(str(data), tok, 2, 32, seed=0, rank=0, world=2)
    want = r0.next_batch()[0]
    again.load_state_dict({"position": 1})
    assert torch.equal(again.next_batch()[0], want)


def test_config_yaml_overrides_and_validation(tmp_path):
    f = tmp_path / "l.yaml"
    f.write_text("model: {actor_path: /m}\nppo: {batch_size: 32, minibatch_size: 8}\nbuffer: {run_id: r1}\n")
    cfg = load(LearnerConfig, f, ["ppo.kl_coef=0.1", "deepspeed.zero_stage=3", "pacing.max_policy_lag=null"])
    assert (cfg.ppo.batch_size, cfg.ppo.kl_coef, cfg.deepspeed.zero_stage) == (32, 0.1, 3)
    assert cfg.buffer.run_id == "r1" and cfg.pacing.max_policy_lag is None
    for bad in (["ppo.minibatch_size=7"], ["ppo.kl_kind=k9"], ["deepspeed.zero_stage=4"], ["ppo.ptx_coef=1"],
                ["ppo.nope=1"], ["pacing.stale_policy=fix"], ["pacing.max_policy_lag=-1"]):
        with pytest.raises((ConfigError, ValueError)):
            load(LearnerConfig, f, bad)
    for old, new in (("max_policy_lag", "pacing.max_policy_lag"), ("stale_policy", "pacing.stale_policy")):
        with pytest.raises(ConfigError, match=rf"buffer\.{old}: this key was renamed; use {new} \(a learner"):
            load(LearnerConfig, f, [f"buffer.{old}=1"])
