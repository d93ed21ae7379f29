"""Typed configuration of the learner (`instructrl serve learner --config FILE key=value ...`).

Nested by concern: `model`, `ppo`, `deepspeed`, `buffer`, `sync`, `checkpoint`, `server`,
`logging`. Batch sizes count *records* (one response each) and are global over all ranks:

    ppo.batch_size       records per iteration (one policy_version)
    ppo.minibatch_size   records per optimizer step
    ppo.micro_batch_size records per forward/backward on one rank

so gradient_accumulation_steps = minibatch_size / (micro_batch_size * world_size), and
the same config run on 1 or N ranks computes the same update (see docs/learner.md).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from instructrl.buffer.config import BufferConfig
from instructrl.buffer.pacing import PacingConfig
from instructrl.config import field
from instructrl.deepspeed_setup import BACKENDS
from instructrl.learner.access import validate_allow
from instructrl.rl import KL_KINDS
from instructrl.serving.server import ServerConfig


@dataclasses.dataclass
class ModelConfig:
    actor_path: str = field("", help="SFT model directory (Hugging Face causal LM): the actor starts here")
    critic_path: str = field(
        "", help="reward-model directory (sequence classifier, num_labels=1): the critic starts here; "
                 "empty = the SFT directory with a fresh zero scalar head")
    dtype: str = field("float32", help="parameter dtype: float32 | bfloat16 (bf16 needs a GPU)")


@dataclasses.dataclass
class PPOConfig:
    batch_size: int = field(64, help="records per iteration, all ranks together (one policy_version each)")
    minibatch_size: int = field(16, help="records per optimizer step, all ranks together")
    micro_batch_size: int = field(4, help="records per forward/backward on one rank")
    epochs: int = field(4, help="PPO epochs over each batch")
    actor_lr: float = field(1e-5, help="AdamW learning rate of the actor")
    critic_lr: float = field(1e-5, help="AdamW learning rate of the critic")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    adam_eps: float = field(1e-8, help="AdamW epsilon")
    max_grad_norm: float = field(1.0, help="gradient clipping (global L2 norm; 0 = off)")
    clip_range: float = field(0.2, help="PPO ratio clip epsilon")
    clip_range_value: float = field(0.2, help="value clip epsilon around the old values (0 = no clipping)")
    gamma: float = field(1.0, help="GAE discount")
    lam: float = field(0.95, help="GAE lambda")
    kl_coef: float = field(0.02, help="beta: per-token KL(actor || SFT) penalty (initial value if adaptive)")
    kl_kind: str = field("k1", help="KL estimator in the reward: k1 | k2 | k3")
    adaptive_kl: bool = field(False, help="adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = field(6.0, help="adaptive KL: target KL per sequence (nats)")
    kl_horizon: float = field(10000.0, help="adaptive KL: horizon in samples")
    whiten_advantages: bool = field(True, help="whiten advantages over the batch")
    temperature: float = field(0.0, help="sampling temperature to train at: each record carries the one it was "
                                         "sampled (and reference-scored) at and the actor's logits are divided "
                                         "by it; > 0 also refuses records of another temperature (dead-lettered, "
                                         "reason temperature); 0 = accept the records' own")
    tis_cap: float = field(0.0, help="truncated importance weight cap for the rollout/learner mismatch "
                                     "and stale records (0 = off; Yao et al. use 2)")
    ptx_coef: float = field(0.0, help="gamma of PPO-ptx: weight of the pretraining LM loss (0 = off)")
    ptx_data: str = field("", help="pretraining text: .txt (one document a line) or .jsonl with a 'text' field")
    ptx_batch_size: int = field(4, help="pretraining sequences per micro-batch")
    ptx_max_len: int = field(256, help="pretraining sequence length cap (tokens)")
    seed: int = field(0, help="seed of the minibatch shuffles and torch")
    max_iterations: int = field(0, help="stop at this policy_version, i.e. after this many iterations "
                                        "(0 = run until stopped)")
    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "ppo.max_iterations"}

    def validate(self) -> None:
        if min(self.batch_size, self.minibatch_size, self.micro_batch_size, self.epochs) < 1:
            raise ValueError("ppo.batch_size, minibatch_size, micro_batch_size and epochs must be >= 1")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"ppo.batch_size {self.batch_size} is not a multiple of "
                             f"minibatch_size {self.minibatch_size}")
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(f"ppo.minibatch_size {self.minibatch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.kl_kind not in KL_KINDS:
            raise ValueError(f"ppo.kl_kind must be one of {KL_KINDS}, got {self.kl_kind!r}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ppo.ptx_data")
        if not self.temperature >= 0:
            raise ValueError(f"ppo.temperature: {self.temperature} must be >= 0 (0 = the records' own)")


@dataclasses.dataclass
class DeepSpeedConfig:
    zero_stage: int = field(0, help="ZeRO stage: 0, 1, 2 or 3 (3 gathers the weights before a sync)")
    backend: str = field("auto", help="torch.distributed backend of the learner ranks: "
                                      "auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    torch_threads: int = field(1, help="torch intra-op threads per rank (0 = torch's default)")

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0..3, got {self.zero_stage}")
        if self.backend not in BACKENDS:
            raise ValueError(f"deepspeed.backend must be auto, gloo or nccl, got {self.backend!r}")


@dataclasses.dataclass
class SyncConfig:
    enabled: bool = field(True, help="broadcast the weights to the registered rollout replicas after each iteration")
    master_addr: str = field("127.0.0.1", help="address of this learner that the replicas can reach (its pod IP)")
    master_port: int = field(29600, help="TCPStore port of the weight group (0 = a free one)")
    backend: str = field("auto", help="auto (nccl on GPU, gloo on CPU) | gloo | nccl")
    timeout_s: float = field(60.0, help="a broadcast never waits longer than this")
    bucket_mb: int = field(64, help="size cap of one broadcast bucket (MiB)")
    every: int = field(1, help="sync every N iterations")
    evict_after_failures: int = field(3, help="forget a registered replica after this many consecutive failed "
                                              "syncs (a live worker re-registers; 0 = never)")


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = field("checkpoints", help="where iteration-NNNNNNNN/ directories (NNNNNNNN = policy_version) "
                                         "are written")
    every: int = field(10, help="checkpoint every N iterations; records are acked after each checkpoint")
    keep: int = field(2, help="checkpoints kept (oldest deleted first)")
    resume: bool = field(True, help="continue from the newest checkpoint in dir if there is one")
    save_hf: bool = field(True, help="also write the actor as a Hugging Face directory (actor_hf/)")

    def validate(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass
class LoggingConfig:
    jsonl: str = field("", help="metrics log, one JSON object per iteration (empty = <checkpoint.dir>/metrics.jsonl)")
    level: str = field("INFO", help="Python log level")
    log_sample_ids: bool = field(False, help="write the trained sample_ids into each JSONL line (audits, tests)")


@dataclasses.dataclass
class LearnerConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="actor and critic initialisation")
    ppo: PPOConfig = field(default_factory=PPOConfig, help="PPO and reward shaping")
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, help="DeepSpeed and torch.distributed")
    buffer: BufferConfig = field(default_factory=BufferConfig, help="the Redis experience buffer")
    pacing: PacingConfig = field(default_factory=PacingConfig, help="how stale the experience trained on may be")
    consumer: str = field("learner-0", help="consumer name in the experience group (stable across restarts)")
    sync: SyncConfig = field(default_factory=SyncConfig, help="weight broadcast to the rollout replicas")
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, help="checkpoints and resume")
    server: ServerConfig = field(default_factory=ServerConfig,
                                 help="the LearnerService gRPC server (rank 0; port -1 = none)")
    logging: LoggingConfig = field(default_factory=LoggingConfig, help="logs")
    register_allow: list[str] = field(default_factory=list, help="addresses RegisterRollout accepts (the learner "
                                      "pushes the policy weights there): 'peer' (the caller's own IP), CIDRs "
                                      "(10.0.0.0/8), host name patterns (*.ns.svc.cluster.local); empty = any "
                                      "host:port")
    on_finish: str = field("exit", help="at ppo.max_iterations: exit (the local launcher), or idle: stay up "
                                        "reporting finished until SIGTERM, so that a restarted pod never "
                                        "trains again (the chart)")

    def validate(self) -> None:
        if not self.model.actor_path:
            raise ValueError("model.actor_path is required")
        if self.on_finish not in ("exit", "idle"):
            raise ValueError(f"on_finish: {self.on_finish!r} is not exit/idle")
        validate_allow(self.register_allow)

    def jsonl_path(self) -> str:
        import os
        return self.logging.jsonl or os.path.join(self.checkpoint.dir, "metrics.jsonl")
