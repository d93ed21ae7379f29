"""PPO through the real buffer raises a toy reward (in-process, no services).

The "rollout" is the test itself: at every weight sync (step 6 of the loop) it loads the
broadcast weights into its own copy of the policy, samples the next batch with
multinomial sampling, scores it (reward = fraction of response tokens in a target set),
computes the SFT reference log-probs and writes the Experience records to Redis, so the
learner trains on-policy (pacing.max_policy_lag = 0) exactly as with a real rollout replica.
"""
from __future__ import annotations

import copy
import json
import time

import torch
from learner_testkit import build_tiny, config, experience, random_prompts, sample, sequence_logprobs
from transformers import AutoModelForCausalLM

from instructrl.buffer import ExperienceBuffer
from instructrl.learner.loop import train
from instructrl.weight_sync import SyncResult

TARGET = range(3, 40)  # the toy reward: fraction of response tokens with these ids (~12% at random)
B, P, T = 16, 4, 8


def score(response: list[int]) -> float:
    return sum(t in TARGET for t in response) / len(response)


def test_ppo_raises_toy_reward(tmp_path, redis_url, run_id):
    t_start = time.monotonic()
    model_dir = build_tiny(tmp_path / "sft")
    cfg = config(tmp_path, model_dir, redis_url, run_id, batch_size=B, minibatch_size=8, micro_batch_size=4,
                 epochs=4, actor_lr=3e-3, critic_lr=3e-3, kl_coef=0.01, max_iterations=12)
    cfg.pacing.max_policy_lag = 0
    cfg.sync.enabled = True
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = copy.deepcopy(reference)
    vocab = reference.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    buffer = ExperienceBuffer.open(cfg.buffer)
    mean_scores: list[float] = []
    loads = []

    def rollout(version: int) -> None:
        prompts = random_prompts(B, P, vocab, gen)
        responses, logprobs = sample(policy, prompts, T, gen)
        ref = sequence_logprobs(reference, prompts, responses)
        scores = [score(r) for r in responses]
        mean_scores.append(sum(scores) / B)
        buffer.put([experience(f"p{version}-{i}/e0/s0", prompts[i], responses[i], logprobs[i], ref[i],
                               scores[i], version) for i in range(B)])

    def sync_fn(named_tensors, version: int) -> SyncResult:  # a replica in-process
        t0 = time.monotonic()
        state = dict(named_tensors())
        loads.append(policy.load_state_dict(state, strict=False))  # (missing, unexpected) keys
        if version < cfg.ppo.max_iterations:
            rollout(version)
        return SyncResult(time.monotonic() - t0, sum(t.numel() * 4 for t in state.values()), ["local"], [])

    rollout(0)
    status = train(cfg, sync_fn=sync_fn)
    buffer.close()

    assert status.policy_version == cfg.ppo.max_iterations
    assert len(loads) == cfg.ppo.max_iterations  # the "replica" got every version, every weight by its HF name
    assert all(not unexpected and not missing for missing, unexpected in loads), loads[0]
    first, last = sum(mean_scores[:3]) / 3, sum(mean_scores[-3:]) / 3
    assert last > first + 0.15, mean_scores
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["policy_version"] for x in lines] == list(range(1, cfg.ppo.max_iterations + 1))
    for key in ("reward_mean", "kl_to_ref", "entropy", "approx_kl", "clip_fraction", "explained_variance",
                "logprob_mismatch_kl", "tokens_per_second", "phase_seconds", "sync_seconds", "buffer_depth"):
        assert key in lines[-1], key
    # on-policy records: the learner's old log-probs match the sampler's up to float noise
    assert max(x["logprob_mismatch_max_abs"] for x in lines) < 1e-3
    assert time.monotonic() - t_start < 60
