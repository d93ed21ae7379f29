"""DeepSpeed setup of the actor and the critic, and the forward passes the loop needs.

Runs on CPU with gloo (ZeRO 0/1/2/3, fp32) as well as on GPUs with NCCL. The optimizer is
a plain `torch.optim.AdamW` handed to `deepspeed.initialize` (DeepSpeed's FusedAdam needs
CUDA, and DeepSpeedCPUAdam a JIT-compiled extension).

Gradient accumulation and data parallelism: DeepSpeed divides each micro-batch loss by
`gradient_accumulation_steps` (GAS) and averages gradients over the W ranks, i.e. scales
the summed micro-batch gradients by 1 / (GAS * W). `loss_divisor` undoes that for a
token-mean loss: a micro-batch loss `sum_tokens / (N_minibatch / (GAS * W))` makes the
applied gradient that of `sum over the minibatch / N_minibatch`, whatever W and GAS are.

Notation: B batch, L input length, T response length, V vocabulary.
"""
from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from instructrl.learner.batch import ExperienceBatch
from instructrl.learner.config import LearnerConfig
from instructrl.rl import gather_logprobs

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl with a GPU, gloo without."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_distributed(cfg: LearnerConfig) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size).

    Under torchrun the env variables are set; a plain `python -m` run is a world of one.
    """
    import deepspeed

    if cfg.deepspeed.torch_threads > 0:
        torch.set_num_threads(cfg.deepspeed.torch_threads)
    backend = resolve_backend(cfg.deepspeed.backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:  # torchrun (or another launcher) set the env://
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:  # a world of one; only LOCAL_RANK (which DeepSpeed asserts) goes into os.environ
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's device (cuda:LOCAL_RANK with NCCL, cpu otherwise)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def grad_accum_steps(cfg: LearnerConfig, world: int) -> int:
    """GAS such that world * GAS * micro_batch_size == minibatch_size."""
    ppo = cfg.ppo
    per_step = ppo.micro_batch_size * world
    if ppo.minibatch_size % per_step or ppo.batch_size % world:
        raise ValueError(f"ppo.minibatch_size {ppo.minibatch_size} must be a multiple of micro_batch_size "
                         f"{ppo.micro_batch_size} x {world} ranks, and batch_size of the rank count")
    return ppo.minibatch_size // per_step


def ds_config(cfg: LearnerConfig, world: int) -> dict:
    """The DeepSpeed JSON config of one engine."""
    return {
        "train_micro_batch_size_per_gpu": cfg.ppo.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world),
        "gradient_clipping": cfg.ppo.max_grad_norm,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, lr: float, cfg: LearnerConfig, world: int):
    """Wrap `model` in a DeepSpeed engine with a torch AdamW optimizer."""
    import deepspeed

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=cfg.ppo.weight_decay, eps=cfg.ppo.adam_eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, world))
    return engine


def loss_divisor(minibatch_tokens: int, world: int, gas: int) -> float:
    """`num_tokens` to pass to the RL losses of one micro-batch (see the module docstring)."""
    return minibatch_tokens / (world * gas)


def policy_forward(actor, batch: ExperienceBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and logits of the response tokens under the actor.

    Returns:
        logprobs `(B, T)` log pi(a_t | s_t), and the response logits `(B, T, V)` (float32,
        divided by the sampling temperature).
    """
    device = next(actor.parameters()).device
    logits = actor(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    index = batch.positions.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, T, V)
    resp_logits = logits.gather(1, index).float() / temperature  # logits[P_b + t - 1] predict a_t
    return gather_logprobs(resp_logits, batch.response_ids.to(device)), resp_logits


def value_forward(critic, batch: ExperienceBatch) -> torch.Tensor:
    """V(s_t) of each response token's state `(B, T)` (read at the position that predicts a_t)."""
    device = next(critic.parameters()).device
    values = critic(batch.input_ids.to(device), batch.attention_mask.to(device))  # (B, L)
    return values.gather(1, batch.positions.to(device))  # (B, T)


def lm_forward(actor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits `(B, L, V)` (the PPO-ptx pretraining term)."""
    device = next(actor.parameters()).device
    return actor(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped per-rank tensors along dim 0 in rank order (identity on one rank)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def hf_named_parameters(engine, rank: int) -> list[tuple[str, torch.Tensor]]:
    """The actor's full parameters as `(HF state_dict name, CPU tensor)`; a collective.

    Under ZeRO-3 every rank must call it (each parameter is gathered from its shards);
    only rank 0 gets the list, the others an empty one. Names are those of the Hugging
    Face model (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
    """
    module = engine.module
    out: list[tuple[str, torch.Tensor]] = []
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out.append((name, p.detach().to("cpu", copy=True)))
        return out
    if rank == 0:
        out = [(name, p.detach().to("cpu")) for name, p in module.named_parameters()]
    return out
