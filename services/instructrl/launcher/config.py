"""The local run's config: which processes to start and the config of each role.

Each role's section is that role's own config (RewardConfig, ReferenceConfig,
RolloutConfig, the rollout worker's, LearnerConfig) as a mapping; the launcher
fills in what only it knows (ports, addresses, the Redis URL, the run id) and
validates every section with the role's dataclass before starting anything, so a
typo fails at once naming the field (`learner.ppo.kl_cof: unknown field`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from instructrl.config import field


@dataclasses.dataclass
class ThreadsConfig:
    reward: int = field(1, help="compute threads of the reward service")
    reference: int = field(1, help="compute threads of the reference service")
    rollout: int = field(1, help="compute threads of each rollout (vLLM) process")
    worker: int = field(1, help="threads of each rollout worker (mostly I/O)")
    learner: int = field(1, help="compute threads of each learner rank")


@dataclasses.dataclass
class LaunchTLSConfig:
    enabled: bool = field(False, help="mTLS and a bearer token between all processes, from a throwaway CA and "
                                      "token generated in <workdir>/tls (launcher/tls.py); health checks use "
                                      "each server's plaintext health port")


@dataclasses.dataclass
class LaunchConfig:
    run_id: str = field("local", help="run id: the Redis namespace and the metrics label")
    workdir: str = field("runs/local", help="logs, generated configs, checkpoints and Redis data go here")
    redis_url: str = field("", help="Redis URL to use; empty = start a private redis-server in workdir")
    rollout_replicas: int = field(1, help="rollout replicas (each: one vLLM service + one worker)")
    prompts: str = field("", help="JSONL of prompts to enqueue: {prompt, prompt_id?, metadata?}")
    epochs: int = field(1, help="passes over the prompts file (each prompt generated once per epoch)")
    health_timeout_s: float = field(600.0, help="how long a service may take to report SERVING")
    grace_s: float = field(20.0, help="seconds each process gets to stop on shutdown")
    learner_stop_timeout_s: float = field(
        180.0, help="seconds the learner gets, on any stop, to finish its iteration and write a checkpoint "
                    "of what it trained (before the other processes stop)")
    stall_timeout_s: float = field(
        600.0, help="fail the run when the learner logs no iteration for this long once it has started "
                    "(e.g. the prompts ran out); 0 = wait forever")
    threads: ThreadsConfig = field(default_factory=ThreadsConfig, help="compute threads per process")
    tls: LaunchTLSConfig = field(default_factory=LaunchTLSConfig, help="mTLS + token (the chart's secure path)")
    reward: dict[str, Any] = field(default_factory=dict, help="RewardConfig of the reward service")
    reference: dict[str, Any] = field(default_factory=dict, help="ReferenceConfig of the reference service")
    rollout: dict[str, Any] = field(default_factory=dict, help="RolloutConfig of every rollout replica")
    worker: dict[str, Any] = field(default_factory=dict, help="config of every rollout worker")
    learner: dict[str, Any] = field(default_factory=dict, help="LearnerConfig of the learner")

    def validate(self) -> None:
        if self.rollout_replicas < 1:
            raise ValueError("rollout_replicas: must be >= 1")
        if self.epochs < 1:
            raise ValueError("epochs: must be >= 1")
