"""The single-process baseline of `bench/loop.py`: the loop's work in sequence, in one process.

Run by `bench/loop.py` as its own process (`python bench/loop_inprocess.py SPEC OUT`): SPEC is the
`instructrl launch` config of the service variants (JSON), so every setting is theirs. One
iteration is what the services do for one batch, one step after the other and with no
transport (no gRPC, no Redis, no weight group):

1. generate `batch_size / n` prompts x n samples with vLLM's `LLM` in this process
   (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core and its worker run here), with the
   rollout service's engine arguments and per-sample sampling parameters;
2. score them with the reward service's core (`ModelReward` + its running normalizer), then
   3. the reference log-probs with the reference service's core (`ReferenceScorer`);
4. build the `Experience` records the rollout worker writes and the learner's `ExperienceBatch`;
5. the learner's PPO update (`instructrl.learner.update`, DeepSpeed engines, world of one) and
   its step 5 (`count_iteration`);
6. the learner's step 6 (`sync_weights`) with an in-process load: the actor's parameters go
   into vLLM's model through `reload_weights`, as the replica's weight-sync extension does.

Writes OUT (JSON): per iteration its end time and phase seconds, plus the thread counts seen.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any

THREADS = os.environ.get("OMP_NUM_THREADS", "1")
os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", MKL_NUM_THREADS=THREADS)


def _reload(worker, named) -> None:  # runs on vLLM's worker, here in this process
    import torch

    with torch.no_grad():
        worker.model_runner.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)


class InProcess:
    """The four roles' cores in one process."""

    def __init__(self, spec: dict):
        from instructrl.config import from_dict
        from instructrl.learner.config import LearnerConfig
        from instructrl.reference.config import ReferenceConfig
        from instructrl.reward.config import RewardConfig
        from instructrl.rollout.config import RolloutConfig
        from instructrl.rollout.worker import WorkerConfig

        self.rollout = from_dict(RolloutConfig, spec["rollout"])
        self.worker = from_dict(WorkerConfig, spec["worker"])
        self.reward_cfg = from_dict(RewardConfig, spec["reward"])
        self.reference_cfg = from_dict(ReferenceConfig, spec["reference"])
        self.learner = from_dict(LearnerConfig, spec["learner"])

    def start(self) -> None:
        from vllm import LLM

        from instructrl.learner.control import Control
        from instructrl.reference.scorer import ReferenceScorer
        from instructrl.reward.normalization import RunningNormalizer
        from instructrl.reward.scorer import load_scorer
        from instructrl.rollout.vllm_engine import engine_args

        kw = engine_args(self.rollout.engine)
        kw.pop("enable_log_requests")  # AsyncLLM's only
        self.llm = LLM(**kw)  # first: the learner's group then reuses its world of one
        self.tokenizer = self.llm.get_tokenizer()
        self.scorer = load_scorer(self.reward_cfg)
        norm = self.reward_cfg.normalization
        self.normalizer = RunningNormalizer(norm.freeze_after, norm.eps) if norm.enabled else None
        self.reference = ReferenceScorer(self.reference_cfg)
        self.run = self._learner()
        self.control = Control()

    def _learner(self):
        import torch
        from transformers import AutoTokenizer

        from instructrl.deepspeed_setup import device, init_distributed
        from instructrl.learner.loop import Run
        from instructrl.learner.models import actor_and_critic, grad_accum_steps
        from instructrl.rl import AdaptiveKLController, FixedKLController

        cfg, ppo = self.learner, self.learner.ppo
        init_distributed(cfg.deepspeed.backend, cfg.deepspeed.torch_threads)
        torch.manual_seed(ppo.seed)
        tok = AutoTokenizer.from_pretrained(cfg.model.actor_path)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        actor, critic = actor_and_critic(cfg, 1)
        kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
                  else FixedKLController(ppo.kl_coef))
        run = Run(cfg, 0, 1, device(), grad_accum_steps(cfg, 1), pad_id, actor, critic, kl_ctl, None)
        run.sync_fn = self._load_weights
        return run

    def _load_weights(self, params, policy_version: int):
        from instructrl.weight_sync import SyncResult

        t0 = time.perf_counter()
        named = list(params())
        self.llm.collective_rpc(_reload, args=(named,))
        self.llm.reset_prefix_cache()
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        return SyncResult(time.perf_counter() - t0, nbytes, ["inprocess"], [])

    def generate(self, prompts: list[dict]) -> list:
        """1. Every sample its own request (seed + i), as `RolloutEngine` does."""
        from vllm.inputs import TokensPrompt

        from instructrl.rollout.domain import resolve_sampling
        from instructrl.rollout.vllm_engine import sampling_params

        lim = self.rollout.limits
        s = resolve_sampling(self.worker.sampling, max_n=lim.max_n, max_model_len=self.rollout.engine.max_model_len,
                             default_max_tokens=lim.default_max_tokens)
        ids = [self.tokenizer.encode(p["prompt"]) for p in prompts]
        reqs = [(TokensPrompt(prompt_token_ids=x), sampling_params(s, i)) for x in ids for i in range(s.n)]
        outs = self.llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
        samples = []
        for k, out in enumerate(outs):
            c: Any = out.outputs[0]
            toks = list(c.token_ids)
            lps = [float(d[t].logprob) for t, d in zip(toks, c.logprobs or [], strict=False)]
            samples.append((prompts[k // s.n], ids[k // s.n], k % s.n, toks, lps, c.finish_reason or "abort"))
        return [x for x in samples if x[3]]

    def iteration(self, prompts: list[dict], phases: dict[str, float]) -> tuple[int, float]:
        """One batch; returns its size and the max |vLLM - learner| log-prob (~0: the weight load took)."""
        from instructrl.learner.batch import from_records
        from instructrl.learner.loop import count_iteration, sync_weights, timed
        from instructrl.learner.update import old_logprobs_and_values, ppo_epochs, shaped_rewards_and_advantages
        from instructrl.reference.scorer import LogProbsInput
        from instructrl.reward.scorer import ScoreInput, score

        run, ppo = self.run, self.learner.ppo
        with timed(phases, "generate"):  # 1.
            samples = self.generate(prompts)
        with timed(phases, "reward"):  # 2.
            raw = score(self.scorer, [ScoreInput(ids, toks, p.get("metadata", {}))
                                      for p, ids, _, toks, _, _ in samples])
            scores = self.normalizer.apply(raw)[0] if self.normalizer else raw
        with timed(phases, "reference"):  # 3.
            items, _ = self.reference.prepare([LogProbsInput(ids + toks, len(ids))
                                               for _, ids, _, toks, _, _ in samples])
            ref = self.reference.forward(items)
        with timed(phases, "records"):  # 4.
            records = self._records(samples, scores, raw, ref)
            batch = from_records(records, [0] * len(records), run.pad_id)
        with timed(phases, "forward"):  # 5. the learner's steps 2-5
            old = old_logprobs_and_values(run.actor, run.critic, batch, ppo, 0, 1)
        with timed(phases, "advantages"):
            adv = shaped_rewards_and_advantages(batch, old, run.kl_ctl.value, ppo)
        with timed(phases, "ppo"):
            ppo_epochs(run.actor, run.critic, batch, old, adv, None, ppo, policy_version=run.policy_version,
                       rank=0, world=1, gas=run.gas, device=run.device)
        count_iteration(run, len(batch), adv)
        with timed(phases, "sync"):  # 6.
            sync_weights(run, self.control, True)
        return len(batch), float(old.mismatch["max_abs_diff"])

    def _records(self, samples: list, scores: list[float], raw: list[float], ref: list) -> list:
        from instructrl.buffer import sample_id_for
        from instructrl.codec import logprobs, tokens
        from instructrl.v1 import experience_pb2

        return [experience_pb2.Experience(
            sample_id=sample_id_for(p["prompt_id"], 0, i), prompt_id=p["prompt_id"], prompt_token_ids=tokens(ids),
            response_token_ids=tokens(toks), finish_reason=reason, sampling_logprobs=logprobs(lps),
            policy_version=self.run.policy_version, ref_logprobs=logprobs(ref[k]), score=scores[k], raw_score=raw[k],
            sample_index=i) for k, (p, ids, i, toks, lps, reason) in enumerate(samples)]


def main(argv: list[str]) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()

    spec = json.loads(pathlib.Path(argv[0]).read_text())
    prompts = [json.loads(x) for x in pathlib.Path(spec["prompts"]).read_text().splitlines() if x.strip()]
    loop = InProcess(spec)
    t0 = time.perf_counter()
    loop.start()
    started_s = time.perf_counter() - t0
    per_batch = loop.learner.ppo.batch_size // loop.worker.sampling.n
    iterations = []
    for it in range(loop.learner.ppo.max_iterations):
        phases: dict[str, float] = {}
        trained, mismatch = loop.iteration(prompts[it * per_batch:(it + 1) * per_batch], phases)
        iterations.append({"time": time.time(), "samples": trained, "phase_seconds": phases,
                           "logprob_max_abs_diff": mismatch})
    out = {"start_s": started_s, "torch_threads": torch.get_num_threads(), "iterations": iterations,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    pathlib.Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
