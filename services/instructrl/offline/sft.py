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

import torch

from instructrl.config import field, to_dict
from instructrl.deepspeed_setup import init_distributed
from instructrl.models.prompt_format import resolve as resolve_prompt_format
from instructrl.offline import data as D
from instructrl.offline import output
from instructrl.offline.config import DeepSpeedConfig, OptimConfig, TrainConfig, run_main, validate_stage
from instructrl.offline.loop import engine_for, optimize, to_device
from instructrl.rl import lm_loss


@dataclasses.dataclass
class SFTDataConfig:
    train_file: str = field("", help="demonstrations JSONL: {\"prompt\": str, \"response\": str} a line")
    eval_file: str = field("", help="held-out demonstrations (empty: hold out eval_fraction of train_file)")
    eval_fraction: float = field(0.05, help="share of train_file held out when eval_file is empty")
    max_length: int = field(256, help="prompt + response tokens kept (longer sequences are cut on the right)")
    append_eos: bool = field(True, help="end every response with the tokenizer's EOS token")
    prompt_format: str = field("", help="raw | chat (the tokenizer's chat_template) | a format string with "
                                        "{prompt}; empty = the one stored with `model` (instructrl.json), else raw")


@dataclasses.dataclass
class SFTConfig:
    model: str = field("", help="input Hugging Face causal LM directory (model + tokenizer)")
    output_dir: str = field("", help="output directory for the SFT model (replaced atomically on success)")
    data: SFTDataConfig = field(default_factory=SFTDataConfig, help="training data")
    train: TrainConfig = field(default_factory=TrainConfig, help="loop")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, help="DeepSpeed")

    def validate(self) -> None:
        validate_stage(self)


def lm_step(engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross entropy over the response tokens of one collated batch (prompt labels are -100)."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = lm_loss(logits, batch["labels"])
    return loss, {"loss": loss.item()}


@torch.no_grad()
def evaluate(engine, examples: list[D.Encoded], batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted mean response cross entropy over ``examples``."""
    engine.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(D.collate_sequences(examples[start:start + batch_size], pad_id), engine.device)
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
    rank, world = init_distributed(cfg.deepspeed.backend, master_port=cfg.deepspeed.master_port)
    torch.manual_seed(cfg.train.seed)

    # 1. data: read and validate, hold out, tokenise
    tok = AutoTokenizer.from_pretrained(cfg.model)
    cfg.data.prompt_format = resolve_prompt_format(cfg.data.prompt_format, cfg.model, "data.prompt_format")
    train_set, eval_set = D.load_splits(tok, cfg.data, cfg.train.seed, D.read_demonstrations,
                                        D.encode_demonstrations)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. model and DeepSpeed engine
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    engine, total_steps = engine_for(model, len(train_set), cfg, rank, world)

    with output.staged_output(cfg.output_dir, rank) as stage, \
            output.MetricsLog(stage / "metrics.jsonl" if stage else None) as log:
        log.write({"event": "start", "stage": "sft", "train_examples": len(train_set),
                   "eval_examples": len(eval_set), "total_steps": total_steps, "world_size": world,
                   "truncated": sum(e.truncated for e in train_set)})
        # 3. loop: one micro-batch per pass, an optimizer step every grad_accum_steps;
        # 4. evaluation on held-out demonstrations every eval_every steps and at the end
        done = optimize(engine, train_set, lambda b: D.collate_sequences(b, pad_id), lambda b: lm_step(engine, b),
                        (lambda: evaluate(engine, eval_set, cfg.train.micro_batch_size, pad_id)) if eval_set else None,
                        cfg.train, total_steps, log, "sft", rank, world)

        # 5. save the HF directory (atomically, when the `with` block ends without error)
        final = {"stage": "sft", "steps": done.steps, "train_seconds": done.seconds,
                 "eval_loss": done.last_eval.get("loss"), "output_dir": cfg.output_dir}
        output.save_hf(engine.module, tok, stage, cfg.deepspeed.zero_stage,
                       {"stage": "sft", "base_model": cfg.model, "config": to_dict(cfg), "metrics": final,
                        "prompt_format": cfg.data.prompt_format})
        log.write({"event": "done", **final})
    return final


def main(argv: list[str]) -> int:
    return run_main(argv, "instructrl sft", __doc__, SFTConfig, train)
