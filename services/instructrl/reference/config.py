"""Configuration of the reference service (`instructrl serve reference --config FILE key=value ...`)."""
from __future__ import annotations

import dataclasses

from instructrl.config import ConfigError, field
from instructrl.serving.batcher import BatchingConfig
from instructrl.serving.server import ServerConfig


@dataclasses.dataclass
class ReferenceConfig:
    model: str = field("", help="HF directory of the frozen SFT model (a causal LM)")
    name: str = field("", help="name reported in LogProbsResponse.model (default: the model directory name)")
    max_seq_len: int = field(0, help="max prompt+response tokens per item (0 = the model's max_position_embeddings)")
    device: str = field("cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    dtype: str = field("auto", help="weights dtype: auto (the checkpoint's bf16/fp16 on GPU, float32 on CPU) | "
                                    "float32 | bfloat16 | float16; scores are computed in float32")
    attn_implementation: str = field("sdpa", help="attention kernel: sdpa | eager | flash_attention_2 | ...")
    torch_threads: int = field(1, help="torch intra-op threads of the forward pass (0 = torch's default)")
    server: ServerConfig = field(default_factory=lambda: ServerConfig(max_connection_age_s=120.0),
                                 help="gRPC server (connections closed after 2 min: scaled-out pods get load)")
    batching: BatchingConfig = field(default_factory=BatchingConfig, help="server-side dynamic batching")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: required (the SFT model's HF directory)")
        if self.max_seq_len < 0:
            raise ConfigError(f"max_seq_len: must be >= 0, got {self.max_seq_len}")
