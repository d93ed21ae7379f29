"""`instructrl rm`: reward-model training on K-wise rankings (InstructGPT stage 2).

The reward model is the SFT model with its LM head replaced by a scalar head: a
``LlamaForSequenceClassification`` (``AutoModelForSequenceClassification``,
``num_labels=1``, ``config.pad_token_id`` set) whose backbone weights are copied
from the SFT checkpoint and whose ``score`` head is fresh. r(x, y) is the head's
output at the last real token of prompt ids + response ids (response ending with
EOS, right padding), which is what ``forward`` pools and what the reward service
reads.

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
import math
import time

import torch

from instructrl.config import field, to_dict
from instructrl.offline import data as D
from instructrl.offline import engine as E
from instructrl.rl import kwise_ranking_loss


@dataclasses.dataclass
class RMDataConfig:
    train_file: str = field("", help="rankings JSONL: {\"prompt\", \"responses\": [best, ..., worst]} (K = 2..9) "
                                     "or {\"prompt\", \"chosen\", \"rejected\"}")
    eval_file: str = field("", help="held-out rankings (empty: hold out eval_fraction of train_file)")
    eval_fraction: float = field(0.05, help="share of train_file held out when eval_file is empty")
    demonstrations_file: str = field("", help="optional SFT demonstrations to measure reward_mean/std on")
    max_length: int = field(256, help="prompt + response tokens kept (longer sequences are cut on the right)")
    append_eos: bool = field(True, help="end every response with EOS, as finished rollouts end")


@dataclasses.dataclass
class RMConfig:
    model: str = field("", help="SFT model directory to initialise the reward model from")
    output_dir: str = field("", help="output directory for the reward model (replaced atomically on success)")
    data: RMDataConfig = field(default_factory=RMDataConfig, help="training data")
    train: E.TrainConfig = field(default_factory=E.TrainConfig, help="loop")
    optim: E.OptimConfig = field(default_factory=E.OptimConfig, help="optimizer")
    deepspeed: E.DeepSpeedConfig = field(default_factory=E.DeepSpeedConfig, help="DeepSpeed")

    def validate(self) -> None:
        E.validate_stage(self)


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
    scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]  # (N,)
    num_prompts = batch["num_responses"].shape[0]
    rewards = D.scatter_rewards(scores, batch["prompt_index"], batch["rank"], num_prompts)  # (B, K)
    loss, accuracy = kwise_ranking_loss(rewards, batch["num_responses"])
    return loss, accuracy, scores


@torch.no_grad()
def evaluate(engine, groups: list[list[D.Encoded]], batch_size: int, pad_id: int) -> dict[str, float]:
    """Pairwise accuracy over every held-out pair, and the prompt-mean K-wise loss."""
    engine.eval()
    loss_sum, right, pairs, scores = 0.0, 0.0, 0, []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        loss, acc, s = ranking_step(engine, D.collate_rankings(chunk, pad_id))
        n_pairs = sum(math.comb(len(g), 2) for g in chunk)
        loss_sum += float(loss) * len(chunk)
        right += float(acc) * n_pairs
        pairs += n_pairs
        scores.append(s)
    engine.train()
    s = torch.cat(scores) if scores else torch.zeros(0)
    return {"loss": loss_sum / max(len(groups), 1), "accuracy": right / max(pairs, 1), "pairs": pairs,
            "reward_mean": float(s.mean()) if len(s) else None, "reward_std": float(s.std()) if len(s) > 1 else None}


@torch.no_grad()
def score_sequences(engine, examples: list[D.Encoded], batch_size: int, pad_id: int) -> torch.Tensor:
    """``(N,)`` r(x, y) of each encoded prompt + response."""
    engine.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        batch = D.collate_sequences(examples[start:start + batch_size], pad_id)
        out.append(engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0])
    engine.train()
    return torch.cat(out)


def train(cfg: RMConfig) -> dict:
    """Train the reward model; returns the final metrics (also the last line of ``metrics.jsonl``)."""
    from transformers import AutoTokenizer

    cfg.validate()
    rank, world = E.init_distributed(cfg.deepspeed)
    torch.manual_seed(cfg.train.seed)

    # 1. data: read and validate, hold out, tokenise (one group of K sequences per prompt)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    train_set, eval_set = D.load_splits(tok, cfg.data, cfg.train.seed, D.read_rankings, D.encode_rankings)
    demos = D.read_demonstrations(cfg.data.demonstrations_file) if cfg.data.demonstrations_file else []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. reward model (SFT backbone + fresh scalar head) and DeepSpeed engine
    model = load_reward_model(cfg.model, pad_id)
    per_epoch = len(D.batch_indices(len(train_set), cfg.train.micro_batch_size, 0, cfg.train.seed, rank, world))
    total_steps = E.total_optimizer_steps(per_epoch, cfg.train)
    engine = E.build_engine(model, cfg.train, cfg.optim, cfg.deepspeed, total_steps)

    with E.staged_output(cfg.output_dir, rank) as stage, \
            E.MetricsLog(stage / "metrics.jsonl" if stage else None) as log:
        log.write({"event": "start", "stage": "rm", "train_prompts": len(train_set),
                   "train_pairs": sum(math.comb(len(g), 2) for g in train_set), "eval_prompts": len(eval_set),
                   "total_steps": total_steps, "world_size": world,
                   "truncated": sum(e.truncated for g in train_set for e in g)})
        bar = E.progress_bar(total_steps, "rm", cfg.train.progress and rank == 0)
        t0 = time.monotonic()
        step, micro, losses, accs, last_eval = 0, 0, [], [], {}
        # 3. loop: a micro-batch is micro_batch_size prompts with all their responses
        for epoch, idx in E.micro_batches(len(train_set), cfg.train, rank, world):
            batch = D.collate_rankings([train_set[i] for i in idx], pad_id)
            loss, acc, _ = ranking_step(engine, batch)  # K-wise loss over the (B, K) reward matrix
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            accs.append(acc.item())
            micro += 1
            if micro % cfg.train.grad_accum_steps:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}")
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.write({"step": step, "epoch": epoch, "split": "train", "loss": E.mean_of(losses),
                           "accuracy": E.mean_of(accs), "lr": engine.get_lr()[0]})
                losses, accs = [], []
            # 4. periodic held-out pairwise accuracy
            if eval_set and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                last_eval = evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)
                log.write({"step": step, "split": "eval", **last_eval})
            if step >= total_steps:
                break
        bar.close()
        if eval_set:
            last_eval = evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)
            log.write({"step": step, "split": "eval", **last_eval})

        # 5. reward statistics for normalisation, then save atomically
        if demos:
            demo_set = D.encode_demonstrations(tok, demos, cfg.data.max_length, cfg.data.append_eos)
            s = score_sequences(engine, demo_set, 4 * cfg.train.micro_batch_size, pad_id)
            stats = {"reward_mean": float(s.mean()), "reward_std": float(s.std()) if len(s) > 1 else 1.0,
                     "reward_stats_on": cfg.data.demonstrations_file}
        else:
            stats = {"reward_mean": last_eval.get("reward_mean"), "reward_std": last_eval.get("reward_std"),
                     "reward_stats_on": "held-out responses"}
        final = {"stage": "rm", "steps": step, "train_seconds": round(time.monotonic() - t0, 2),
                 "eval_loss": last_eval.get("loss"), "eval_accuracy": last_eval.get("accuracy"),
                 **stats, "output_dir": cfg.output_dir}
        E.save_hf(engine.module, tok, stage, cfg.deepspeed.zero_stage,
                  {"stage": "rm", "base_model": cfg.model, "config": to_dict(cfg), "metrics": final, **stats})
        log.write({"event": "done", **final})
    return final


def main(argv: list[str]) -> int:
    return E.run_main(argv, "instructrl rm", __doc__, RMConfig, train)
