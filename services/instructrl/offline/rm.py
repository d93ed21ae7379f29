"""`instructrl rm`: reward-model training on K-wise rankings (InstructGPT stage 2).

The reward model is the SFT model with its LM head replaced by a scalar head: a
``LlamaForSequenceClassification`` (``AutoModelForSequenceClassification``,
``num_labels=1``, ``config.pad_token_id`` set) whose backbone weights are copied
from the SFT checkpoint and whose ``score`` head is fresh. r(x, y) is the head's
output at the last real token of prompt ids + response ids (response ending with
EOS, right padding), read through ``models/reward_head.py`` as the reward service
and the critic read it (not transformers' pooling, which skips an EOS that is also
the pad token). The held-out scores are saved in ``eval_scores.jsonl``.

Loss (Ouyang et al. 2022, eq. 1): each batch element is one prompt with all K of
its ranked responses; the K scores form a row of a ``(B, K)`` matrix and

    loss = -1/C(K,2) sum_{i ranked above j} log sigmoid(r(x, y_i) - r(x, y_j))

is computed by ``instructrl.rl.kwise_ranking_loss``. Keeping a prompt's C(K,2)
comparisons in one element needs one forward pass per response rather than one
per comparison, and avoids the overfitting InstructGPT saw when the pairs were
shuffled as separate examples.
A ``{"chosen", "rejected"}`` line is a ranking with K = 2.

After training, ``instructrl.json`` holds ``reward_mean`` and ``reward_std`` of the
model's scores on ``data.demonstrations_file`` (InstructGPT shifts the reward so
that demonstrations score 0 on average before RL) or, without it, on the held-out
responses. The model itself is saved unshifted.

Departures from InstructGPT: 6B RM trained one epoch with lr 9e-6 and cosine
decay; here the size and schedule come from the config (default one epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

from instructrl.config import field, to_dict
from instructrl.deepspeed_setup import init_distributed
from instructrl.models.prompt_format import resolve as resolve_prompt_format
from instructrl.models.reward_head import ScalarHeadModel, at_reward_position
from instructrl.offline import data as D
from instructrl.offline import output
from instructrl.offline.config import DeepSpeedConfig, OptimConfig, TrainConfig, run_main, validate_stage
from instructrl.offline.loop import engine_for, optimize, to_device
from instructrl.rl import kwise_ranking_loss

EVAL_SCORES = "eval_scores.jsonl"  # the held-out scores, next to the saved model


@dataclasses.dataclass
class RMDataConfig:
    train_file: str = field("", help="rankings JSONL: {\"prompt\", \"responses\": [best, ..., worst]} (K = 2..9) "
                                     "or {\"prompt\", \"chosen\", \"rejected\"}")
    eval_file: str = field("", help="held-out rankings (empty: hold out eval_fraction of train_file)")
    eval_fraction: float = field(0.05, help="share of train_file held out when eval_file is empty")
    demonstrations_file: str = field("", help="optional SFT demonstrations to measure reward_mean/std on")
    max_length: int = field(256, help="prompt + response tokens kept (longer sequences are cut on the right)")
    append_eos: bool = field(True, help="end every response with EOS, as finished rollouts end")
    prompt_format: str = field("", help="raw | chat (the tokenizer's chat_template) | a format string with "
                                        "{prompt}; empty = the one stored with `model` (instructrl.json), else raw")


@dataclasses.dataclass
class RMConfig:
    model: str = field("", help="SFT model directory to initialise the reward model from")
    output_dir: str = field("", help="output directory for the reward model (replaced atomically on success)")
    data: RMDataConfig = field(default_factory=RMDataConfig, help="training data")
    train: TrainConfig = field(default_factory=TrainConfig, help="loop")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, help="DeepSpeed")

    def validate(self) -> None:
        validate_stage(self)


def load_reward_model(path: str, pad_token_id: int):
    """A scalar-head sequence classifier from a causal-LM (or reward-model) directory."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped lm_head and the new score head are expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, pad_token_id=pad_token_id, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(level)
    model.config.pad_token_id = pad_token_id
    return model


def ranking_step(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores of all responses, the K-wise loss and pair accuracy for one collated batch."""
    values = engine(batch["input_ids"], batch["attention_mask"])                      # (N, L)
    scores = at_reward_position(values, batch["attention_mask"])                      # (N,) at the last real token
    num_prompts = batch["num_responses"].shape[0]
    rewards = D.scatter_rewards(scores, batch["prompt_index"], batch["rank"], num_prompts)  # (B, K)
    loss, accuracy = kwise_ranking_loss(rewards, batch["num_responses"])
    return loss, accuracy, scores


@torch.no_grad()
def evaluate(engine, groups: list[list[D.Encoded]], batch_size: int, pad_id: int) -> dict[str, float | None]:
    """Pairwise accuracy over every held-out pair, and the prompt-mean K-wise loss."""
    engine.eval()
    loss_sum, right, pairs, scores = 0.0, 0.0, 0, []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        loss, acc, s = ranking_step(engine, to_device(D.collate_rankings(chunk, pad_id), engine.device))
        n_pairs = sum(math.comb(len(g), 2) for g in chunk)
        loss_sum += float(loss) * len(chunk)
        right += float(acc) * n_pairs
        pairs += n_pairs
        scores.append(s)
    engine.train()
    s = torch.cat(scores) if scores else torch.zeros(0)
    return {"loss": loss_sum / max(len(groups), 1), "accuracy": right / max(pairs, 1), "pairs": pairs,
            "reward_mean": float(s.mean()) if len(s) else None,
            "reward_std": float(s.std()) if len(s) > 1 else None}


@torch.no_grad()
def score_sequences(engine, examples: list[D.Encoded], batch_size: int, pad_id: int) -> torch.Tensor:
    """``(N,)`` r(x, y) of each encoded prompt + response."""
    engine.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(D.collate_sequences(examples[start:start + batch_size], pad_id), engine.device)
        out.append(at_reward_position(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]))
    engine.train()
    return torch.cat(out)


def write_eval_scores(path, records: list[D.Ranking], scores: torch.Tensor) -> None:
    """One line per held-out (prompt, response): its rank (0 = best) and r(x, y) as the RM reads it."""
    rows = [(rk.prompt, k, r) for rk in records for k, r in enumerate(rk.responses)]
    with open(path, "w") as f:
        for (prompt, k, response), s in zip(rows, scores.tolist(), strict=True):
            f.write(json.dumps({"prompt": prompt, "response": response, "rank": k, "score": s}) + "\n")


def train(cfg: RMConfig) -> dict:
    """Train the reward model; returns the final metrics (also the last line of ``metrics.jsonl``)."""
    from transformers import AutoTokenizer

    cfg.validate()
    rank, world = init_distributed(cfg.deepspeed.backend, master_port=cfg.deepspeed.master_port)
    torch.manual_seed(cfg.train.seed)

    # 1. data: read and validate, hold out, tokenise (one group of K sequences per prompt)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    train_records, eval_records = D.read_splits(cfg.data, cfg.train.seed, D.read_rankings)
    fmt = cfg.data.prompt_format = resolve_prompt_format(cfg.data.prompt_format, cfg.model, "data.prompt_format")
    train_set, eval_set = (D.encode_rankings(tok, r, cfg.data.max_length, cfg.data.append_eos, fmt)
                           for r in (train_records, eval_records))
    demos = D.read_demonstrations(cfg.data.demonstrations_file) if cfg.data.demonstrations_file else []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. reward model (SFT backbone + fresh scalar head) and DeepSpeed engine
    model = ScalarHeadModel(load_reward_model(cfg.model, pad_id))  # read at the last real token (reward_head)
    engine, total_steps = engine_for(model, len(train_set), cfg, rank, world)

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, acc, _ = ranking_step(engine, batch)  # K-wise loss over the (B, K) reward matrix
        return loss, {"loss": loss.item(), "accuracy": acc.item()}

    with output.staged_output(cfg.output_dir, rank) as stage, \
            output.MetricsLog(stage / "metrics.jsonl" if stage else None) as log:
        log.write({"event": "start", "stage": "rm", "train_prompts": len(train_set),
                   "train_pairs": sum(math.comb(len(g), 2) for g in train_set), "eval_prompts": len(eval_set),
                   "total_steps": total_steps, "world_size": world,
                   "truncated": sum(e.truncated for g in train_set for e in g)})
        # 3. loop: a micro-batch is micro_batch_size prompts with all their responses;
        # 4. held-out pairwise accuracy every eval_every steps and at the end
        done = optimize(engine, train_set, lambda b: D.collate_rankings(b, pad_id), step,
                        (lambda: evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)) if eval_set else None,
                        cfg.train, total_steps, log, "rm", rank, world)
        last_eval = done.last_eval

        # 5. reward statistics for normalisation, the held-out scores, then save atomically
        batch_size = 4 * cfg.train.micro_batch_size
        if demos:
            demo_set = D.encode_demonstrations(tok, demos, cfg.data.max_length, cfg.data.append_eos, fmt)
            s = score_sequences(engine, demo_set, batch_size, pad_id)
            stats = {"reward_mean": float(s.mean()), "reward_std": float(s.std()) if len(s) > 1 else 1.0,
                     "reward_stats_on": cfg.data.demonstrations_file}
        else:
            stats = {"reward_mean": last_eval.get("reward_mean"), "reward_std": last_eval.get("reward_std"),
                     "reward_stats_on": "held-out responses"}
        final = {"stage": "rm", "steps": done.steps, "train_seconds": done.seconds,
                 "eval_loss": last_eval.get("loss"), "eval_accuracy": last_eval.get("accuracy"),
                 **stats, "output_dir": cfg.output_dir}
        if eval_set:  # every rank scores (a collective under ZeRO-3), rank 0 writes
            held_out = score_sequences(engine, [e for g in eval_set for e in g], batch_size, pad_id)
            if stage is not None:
                write_eval_scores(stage / EVAL_SCORES, eval_records, held_out)
        output.save_hf(engine.module.seq_cls, tok, stage, cfg.deepspeed.zero_stage,
                       {"stage": "rm", "base_model": cfg.model, "config": to_dict(cfg), "metrics": final, **stats,
                        "prompt_format": fmt})
        log.write({"event": "done", **final})
    return final


def main(argv: list[str]) -> int:
    return run_main(argv, "instructrl rm", __doc__, RMConfig, train)
