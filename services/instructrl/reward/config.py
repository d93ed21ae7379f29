"""Configuration of the reward service (`instructrl serve reward --config FILE key=value ...`)."""
from __future__ import annotations

import dataclasses

from instructrl.config import ConfigError, field
from instructrl.serving.batcher import BatchingConfig
from instructrl.serving.server import ServerConfig


@dataclasses.dataclass
class NormalizationConfig:
    enabled: bool = field(False, help="report scores as (raw - mean) / std")
    source: str = field("running", help="running: mean/std of the scores this replica served | saved: the "
                                        "RM stage's statistics on the SFT demonstrations (reward_mean/"
                                        "reward_std in <model>/instructrl.json; the same on every replica)")
    freeze_after: int = field(0, help="stop updating mean/std after this many scores (0 = never freeze)")
    eps: float = field(1e-6, help="lower bound of the std divided by")


@dataclasses.dataclass
class RewardConfig:
    model: str = field("", help="HF directory of the reward model (sequence classification, one label); "
                                "empty when `rule` is set")
    rule: str = field("", help="rule-based reward as `package.module:function`, called as "
                               "fn(prompt, response, metadata) -> float; empty = use `model`")
    tokenizer: str = field("", help="tokenizer directory (default: `model`); a rule needs one only "
                                    "to decode token-id inputs")
    prompt_format: str = field("", help="how text prompts are formatted before tokenizing: raw | chat | a format "
                                        "string with {prompt}; empty = the one stored with `model`, else raw")
    name: str = field("", help="name reported in ScoreResponse.model (default: model directory name or rule)")
    max_seq_len: int = field(0, help="max prompt+response tokens per item (0 = the model's "
                                     "max_position_embeddings; 4096 for rules)")
    device: str = field("cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    dtype: str = field("auto", help="weights dtype: auto (the checkpoint's bf16/fp16 on GPU, float32 on CPU) | "
                                    "float32 | bfloat16 | float16; scores are computed in float32")
    attn_implementation: str = field("sdpa", help="attention kernel: sdpa | eager | flash_attention_2 | ...")
    torch_threads: int = field(1, help="torch intra-op threads of the forward pass (0 = torch's default)")
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig,
                                               help="running reward normalisation")
    server: ServerConfig = field(default_factory=lambda: ServerConfig(max_connection_age_s=120.0),
                                 help="gRPC server (connections closed after 2 min: scaled-out pods get load)")
    batching: BatchingConfig = field(default_factory=BatchingConfig, help="server-side dynamic batching")

    def validate(self) -> None:
        if bool(self.model) == bool(self.rule):
            raise ConfigError("model/rule: set exactly one of `model` (a reward model) or `rule`")
        if self.rule and ":" not in self.rule:
            raise ConfigError(f"rule: expected `package.module:function`, got {self.rule!r}")
        if self.max_seq_len < 0:
            raise ConfigError(f"max_seq_len: must be >= 0, got {self.max_seq_len}")
        if self.normalization.freeze_after < 0:
            raise ConfigError("normalization.freeze_after: must be >= 0")
        if self.normalization.source not in ("running", "saved"):
            raise ConfigError(f"normalization.source: {self.normalization.source!r} is not running/saved")
        if self.normalization.enabled and self.normalization.source == "saved" and not self.model:
            raise ConfigError("normalization.source: saved statistics come with a reward model; a rule has none")
