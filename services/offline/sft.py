"""`instructrl sft`: supervised fine-tuning on demonstrations (InstructGPT stage 1).

    loss = -1/N sum over response tokens t of log pi(y_t | x, y_<t)

Prompt tokens and padding carry label -100 and are not scored; the response ends
with EOS, which is scored, so the model learns to stop. Input: a HF causal LM
directory; output: a HF causal LM directory (model, tokenizer, ``metrics.jsonl``,
``instructrl.json``), written atomically.

Departures from InstructGPT (Ouyang et al. 2022, appendix C.1): they train 16
epochs with cosine decay and residual dropout 0.2 and pick the checkpoint by RM
score on a validation set; we train the configured epochs with the configured
schedule, no dropout, and keep the last checkpoint (the eval loss is logged).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from instructrl.config import field, to_dict
from instructrl.offline import data as D
from instructrl.offline import engine as E
from instructrl.rl import lm_loss


@dataclasses.dataclass
class SFTDataConfig:
    train_file: str = field("", help="demonstrations JSONL: {\"prompt\": str, \"response\": str} a line")
    eval_file: str = field("", help="held-out demonstrations (empty: hold out eval_fraction of train_file)")
    eval_fraction: float = field(0.05, help="share of train_file held out when eval_file is empty")
    max_length: int = field(256, help="prompt + response tokens kept (longer sequences are cut on the right)")
    append_eos: bool = field(True, help="end every response with the tokenizer's EOS token")


@dataclasses.dataclass
class SFTConfig:
    model: str = field("", help="input Hugging Face causal LM directory (model + tokenizer)")
    output_dir: str = field("", help="output directory for the SFT model (replaced atomically on success)")
    data: SFTDataConfig = field(default_factory=SFTDataConfig, help="training data")
    train: E.TrainConfig = field(default_factory=E.TrainConfig, help="loop")
    optim: E.OptimConfig = field(default_factory=E.OptimConfig, help="optimizer")
    deepspeed: E.DeepSpeedConfig = field(default_factory=E.DeepSpeedConfig, help="DeepSpeed")

    def validate(self) -> None:
        E.validate_stage(self)


@torch.no_grad()
def evaluate(engine, examples: list[D.Encoded], batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted mean response cross entropy over ``examples``."""
    engine.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = D.collate_sequences(examples[start:start + batch_size], pad_id)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
        total += float(lm_loss(logits, batch["labels"])) * n
        tokens += n
    engine.train()
    return {"loss": total / max(tokens, 1), "tokens": tokens}


def train(cfg: SFTConfig) -> dict:
    """Run SFT; returns the final metrics (also the last line of ``metrics.jsonl``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    rank, world = E.init_distributed(cfg.deepspeed)
    torch.manual_seed(cfg.train.seed)

    # 1. data: read and validate, hold out, tokenise
    tok = AutoTokenizer.from_pretrained(cfg.model)
    train_set, eval_set = D.load_splits(tok, cfg.data, cfg.train.seed, D.read_demonstrations,
                                        D.encode_demonstrations)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. model and DeepSpeed engine
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    per_epoch = len(D.batch_indices(len(train_set), cfg.train.micro_batch_size, 0, cfg.train.seed, rank, world))
    total_steps = E.total_optimizer_steps(per_epoch, cfg.train)
    engine = E.build_engine(model, cfg.train, cfg.optim, cfg.deepspeed, total_steps)

    with E.staged_output(cfg.output_dir, rank) as stage, \
            E.MetricsLog(stage / "metrics.jsonl" if stage else None) as log:
        log.write({"event": "start", "stage": "sft", "train_examples": len(train_set),
                   "eval_examples": len(eval_set), "total_steps": total_steps, "world_size": world,
                   "truncated": sum(e.truncated for e in train_set)})
        bar = E.progress_bar(total_steps, "sft", cfg.train.progress and rank == 0)
        t0 = time.monotonic()
        step, micro, losses, last_eval = 0, 0, [], {}
        # 3. loop: one micro-batch per iteration, an optimizer step every grad_accum_steps
        for epoch, idx in E.micro_batches(len(train_set), cfg.train, rank, world):
            batch = D.collate_sequences([train_set[i] for i in idx], pad_id)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, batch["labels"])  # mean CE over response tokens (prompt labels are -100)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            micro += 1
            if micro % cfg.train.grad_accum_steps:
                continue
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % cfg.train.log_every == 0 or step == total_steps:
                log.write({"step": step, "epoch": epoch, "split": "train", "loss": E.mean_of(losses),
                           "lr": engine.get_lr()[0]})
                losses = []
            # 4. periodic evaluation on held-out demonstrations
            if eval_set and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                last_eval = evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)
                log.write({"step": step, "split": "eval", **last_eval})
            if step >= total_steps:
                break
        bar.close()
        if eval_set:
            last_eval = evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)
            log.write({"step": step, "split": "eval", **last_eval})

        # 5. save the HF directory (atomically, when the `with` block ends without error)
        final = {"stage": "sft", "steps": step, "train_seconds": round(time.monotonic() - t0, 2),
                 "eval_loss": last_eval.get("loss"), "output_dir": cfg.output_dir}
        E.save_hf(engine.module, tok, stage, cfg.deepspeed.zero_stage,
                  {"stage": "sft", "base_model": cfg.model, "config": to_dict(cfg), "metrics": final})
        log.write({"event": "done", **final})
    return final


def main(argv: list[str]) -> int:
    return E.run_main(argv, "instructrl sft", __doc__, SFTConfig, train)
