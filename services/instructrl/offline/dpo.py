"""`instructrl dpo`: Direct Preference Optimisation against the frozen SFT model.

An offline alternative to the RM + PPO stages (Rafailov et al. 2023). The policy
starts from the SFT model; a frozen copy of it (or ``dpo.ref_model``) is the
reference. For each pair the summed response log-probabilities
log pi(y | x) = sum_t log pi(y_t | x, y_<t) (logits at t-1 score token t, EOS
included) of policy and reference go into ``instructrl.rl.dpo_loss``:

    loss = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

(with optional conservative label smoothing). The implicit reward of a response
is beta * (log pi(y) - log pi_ref(y)); the metrics log reports its chosen-minus-
rejected margin and the share of pairs where it is positive.

Input: pairs ``{"prompt", "chosen", "rejected"}``, or rankings, each contributing all
of its C(K,2) pairs. Output: a HF causal LM directory, written atomically.
"""
from __future__ import annotations

import dataclasses

import torch

from instructrl.config import ConfigError, field, to_dict
from instructrl.deepspeed_setup import init_distributed
from instructrl.models.prompt_format import resolve as resolve_prompt_format
from instructrl.offline import data as D
from instructrl.offline import output
from instructrl.offline.config import DeepSpeedConfig, OptimConfig, TrainConfig, run_main, validate_stage
from instructrl.offline.loop import engine_for, optimize, to_device
from instructrl.rl import dpo_loss, gather_logprobs, sequence_logprobs


@dataclasses.dataclass
class DPODataConfig:
    train_file: str = field("", help="pairs JSONL: {\"prompt\", \"chosen\", \"rejected\"} "
                                     "(rankings {\"prompt\", \"responses\"} give all their pairs)")
    eval_file: str = field("", help="held-out pairs (empty: hold out eval_fraction of train_file)")
    eval_fraction: float = field(0.05, help="share of train_file held out when eval_file is empty")
    max_length: int = field(256, help="prompt + response tokens kept (longer sequences are cut on the right)")
    append_eos: bool = field(True, help="end every response with EOS")
    prompt_format: str = field("", help="raw | chat (the tokenizer's chat_template) | a format string with "
                                        "{prompt}; empty = the one stored with `model` (instructrl.json), else raw")


@dataclasses.dataclass
class DPOLossConfig:
    beta: float = field(0.1, help="beta, inverse temperature of the implicit reward (KL strength)")
    label_smoothing: float = field(0.0, help="assumed share of flipped labels (conservative DPO); 0 = plain DPO")
    ref_model: str = field("", help="reference model directory (empty: the `model` it starts from)")

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("dpo.beta: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("dpo.label_smoothing: must lie in [0, 0.5)")


@dataclasses.dataclass
class DPOConfig:
    model: str = field("", help="SFT model directory: the policy's start and (by default) the reference")
    output_dir: str = field("", help="output directory for the DPO policy (replaced atomically on success)")
    data: DPODataConfig = field(default_factory=DPODataConfig, help="training data")
    dpo: DPOLossConfig = field(default_factory=DPOLossConfig, help="loss")
    train: TrainConfig = field(default_factory=TrainConfig, help="loop")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, help="DeepSpeed")

    def validate(self) -> None:
        validate_stage(self)
        self.dpo.validate()


def response_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` log pi(y | x): logits ``(N, L, V)`` at position t-1 score label t; prompt/padding labels are -100."""
    targets = labels[:, 1:]  # (N, L-1) token t
    mask = targets != D.IGNORE_INDEX  # response tokens
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    logps = gather_logprobs(logits[:, :-1], safe)  # (N, L-1) log pi(y_t | s_t), from logits[t-1]
    return sequence_logprobs(logps, mask)


def pair_step(engine, reference, batch: dict[str, torch.Tensor], cfg: DPOLossConfig):
    """DPO loss, implicit rewards and accuracy for one collated batch (chosen rows, then rejected rows)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy = response_logprobs(engine(**inputs).logits, batch["labels"])  # (2B,)
    with torch.no_grad():
        ref = response_logprobs(reference(**inputs).logits, batch["labels"])  # (2B,)
    b = policy.shape[0] // 2
    return dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], cfg.beta, cfg.label_smoothing)


@torch.no_grad()
def evaluate(engine, reference, pairs: list, batch_size: int, pad_id: int, cfg: DPOLossConfig) -> dict[str, float]:
    engine.eval()
    loss_sum, acc_sum, margin_sum = 0.0, 0.0, 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = to_device(D.collate_pairs(chunk, pad_id), engine.device)
        loss, chosen, rejected, acc = pair_step(engine, reference, batch, cfg)
        loss_sum += float(loss) * len(chunk)
        acc_sum += float(acc) * len(chunk)
        margin_sum += float((chosen - rejected).sum())
    engine.train()
    n = max(len(pairs), 1)
    return {"loss": loss_sum / n, "accuracy": acc_sum / n, "reward_margin": margin_sum / n}


def train(cfg: DPOConfig) -> dict:
    """Run DPO; returns the final metrics (also the last line of ``metrics.jsonl``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    rank, world = init_distributed(cfg.deepspeed.backend, master_port=cfg.deepspeed.master_port)
    torch.manual_seed(cfg.train.seed)

    # 1. data: read and validate, hold out, tokenise
    tok = AutoTokenizer.from_pretrained(cfg.model)
    cfg.data.prompt_format = resolve_prompt_format(cfg.data.prompt_format, cfg.model, "data.prompt_format")
    train_set, eval_set = D.load_splits(tok, cfg.data, cfg.train.seed, D.read_pairs, D.encode_pairs)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. policy under DeepSpeed; frozen reference outside it, on the same device
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(cfg.dpo.ref_model or cfg.model, dtype=torch.float32)
    reference.eval().requires_grad_(False)
    engine, total_steps = engine_for(model, len(train_set), cfg, rank, world)
    reference.to(engine.device)

    def step(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen, rejected, acc = pair_step(engine, reference, batch, cfg.dpo)
        return loss, {"loss": loss.item(), "accuracy": acc.item(), "reward_margin": float((chosen - rejected).mean())}

    with output.staged_output(cfg.output_dir, rank) as stage, \
            output.MetricsLog(stage / "metrics.jsonl" if stage else None) as log:
        log.write({"event": "start", "stage": "dpo", "train_pairs": len(train_set), "eval_pairs": len(eval_set),
                   "total_steps": total_steps, "world_size": world,
                   "truncated": sum(c.truncated or r.truncated for c, r in train_set)})
        # 3. loop; 4. evaluation on held-out pairs every eval_every steps and at the end
        def evaluate_fn():
            return evaluate(engine, reference, eval_set, cfg.train.micro_batch_size, pad_id, cfg.dpo)
        done = optimize(engine, train_set, lambda b: D.collate_pairs(b, pad_id), step,
                        evaluate_fn if eval_set else None, cfg.train, total_steps, log, "dpo", rank, world)

        # 5. save atomically
        final = {"stage": "dpo", "steps": done.steps, "train_seconds": done.seconds,
                 "eval_loss": done.last_eval.get("loss"), "eval_accuracy": done.last_eval.get("accuracy"),
                 "eval_reward_margin": done.last_eval.get("reward_margin"), "output_dir": cfg.output_dir}
        output.save_hf(engine.module, tok, stage, cfg.deepspeed.zero_stage,
                       {"stage": "dpo", "base_model": cfg.model, "config": to_dict(cfg), "metrics": final,
                        "prompt_format": cfg.data.prompt_format})
        log.write({"event": "done", **final})
    return final


def main(argv: list[str]) -> int:
    return run_main(argv, "instructrl dpo", __doc__, DPOConfig, train)
