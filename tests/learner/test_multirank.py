"""2 ranks (torchrun, gloo) compute the same update as 1 rank on the same data.

The gradient-accumulation invariant (TRL tests/invariant): a minibatch of 4 records is
1 rank x 4 accumulated micro-batches or 2 ranks x 2; the loss of each micro-batch is
its token sum over the minibatch's token count, so both sum to the same gradient. The
records have different response lengths, so a mean of per-micro-batch means would
differ. AdamW's epsilon is set far above sqrt(v) so that its update is proportional to
the gradient (with the default epsilon Adam's first steps are ~lr * sign(g) and would
hide a wrong gradient scale). Also covers ZeRO-2 and the ZeRO-3 gather of the weights.
"""
from __future__ import annotations

import pytest
import torch
from learner_testkit import build_tiny, config, random_records, read_jsonl, start_learner, write_config
from safetensors.torch import load_file

from instructrl.buffer import ExperienceBuffer

STATS = ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "explained_variance", "kl_to_ref")


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, redis_url, run_id):
    model_dir = build_tiny(tmp_path / "sft")
    records = random_records(8, vocab=300, seed=3)

    def run(name: str, nproc: int, zero_stage: int) -> tuple[dict, dict]:
        out = tmp_path / name
        out.mkdir()
        cfg = config(out, model_dir, redis_url, f"{run_id}-{name}", batch_size=8, minibatch_size=4,
                     micro_batch_size=1, epochs=2, max_iterations=1, actor_lr=0.1, critic_lr=0.1,
                     adam_eps=1.0, kl_coef=0.05)
        cfg.deepspeed.zero_stage = zero_stage
        cfg.checkpoint.save_hf = True
        with ExperienceBuffer.open(cfg.buffer) as buf:
            buf.put(records)
        proc = start_learner(write_config(cfg, out / "learner.yaml"), out / "learner.log", nproc=nproc)
        assert proc.wait(240) == 0, (out / "learner.log").read_text()[-4000:]
        weights = load_file(str(out / "ckpt" / "iteration-00000001" / "actor_hf" / "model.safetensors"))
        return weights, read_jsonl(out / "metrics.jsonl")[-1]

    one, one_stats = run("one", 1, 0)
    initial = load_file(str(tmp_path / "sft" / "model.safetensors"))
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "the update must be large against the tolerance"
    for name, stage in (("two-zero2", 2), ("two-zero3", 3)):
        two, two_stats = run(name, 2, stage)
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-6,
                                       msg=lambda m, k=k, name=name: f"{name} {k}: {m}")
        for key in STATS:
            assert two_stats[key] == pytest.approx(one_stats[key], rel=1e-4, abs=1e-6), (name, key)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,first,then", [(3, 2, 1), (2, 1, 2)])
def test_resume_on_another_rank_count_continues_the_same_curve(tmp_path, redis_url, run_id, zero_stage, first, then):
    """ZeRO shards the optimizer by rank: a checkpoint of `first` ranks, resumed on `then`
    ranks (re-sharded through DeepSpeed's universal checkpoint), gives step 2 of a straight run."""
    model_dir = build_tiny(tmp_path / "sft")
    records = random_records(16, vocab=300, seed=3)

    def cfg_for(name: str, steps: int):
        (tmp_path / name).mkdir(exist_ok=True)
        cfg = config(tmp_path / name, model_dir, redis_url, f"{run_id}-{name}", batch_size=8, minibatch_size=4,
                     micro_batch_size=1, epochs=2, max_iterations=steps, actor_lr=1e-2, critic_lr=1e-2)
        cfg.deepspeed.zero_stage = zero_stage
        cfg.checkpoint.every = 1
        return cfg

    def run(name: str, steps: int, nproc: int) -> None:
        log = tmp_path / name / f"learner-{steps}.log"
        proc = start_learner(write_config(cfg_for(name, steps), tmp_path / name / f"l{steps}.yaml"), log, nproc=nproc)
        assert proc.wait(300) == 0, log.read_text()[-4000:]

    for name in ("straight", "resumed"):
        with ExperienceBuffer.open(cfg_for(name, 0).buffer) as buf:
            buf.put(records)
    run("straight", 2, 2)
    run("resumed", 1, first)
    run("resumed", 2, then)
    assert (tmp_path / "resumed" / "ckpt" / "iteration-00000001" / "universal" / "actor").is_dir()
    straight, resumed = (read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("straight", "resumed"))
    assert [x["policy_version"] for x in resumed] == [1, 2] and resumed[-1]["samples_trained"] == 16
    for key in ("policy_loss", "value_loss", "approx_kl", "entropy", "reward_mean"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4, abs=1e-6), key
