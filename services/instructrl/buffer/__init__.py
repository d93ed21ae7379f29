"""The Redis experience buffer: prompt and experience streams with consumer groups.

See docs/buffer.md for keys, guarantees and failure handling.
"""
from instructrl.buffer.config import BufferConfig, Keys, RedisConfig
from instructrl.buffer.connection import delete_run, redis_from_url
from instructrl.buffer.experience import Batch, ExperienceBuffer, read_dead_letters
from instructrl.buffer.pacing import PacingConfig
from instructrl.buffer.prompts import ClaimedPrompts, PromptQueue, sample_id_for
from instructrl.buffer.streams import BufferFull
from instructrl.buffer.validate import PoisonRecord, check_experience, check_prompt

__all__ = [
    "Batch", "BufferConfig", "BufferFull", "ClaimedPrompts", "ExperienceBuffer", "Keys", "PacingConfig",
    "PoisonRecord", "PromptQueue", "RedisConfig", "check_experience", "check_prompt", "delete_run",
    "read_dead_letters", "redis_from_url", "sample_id_for",
]
