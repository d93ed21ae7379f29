"""The Redis experience buffer: prompt and experience streams with consumer groups.

See docs/buffer.md for keys, guarantees and failure handling.
"""
from instructrl.buffer.aio import AsyncExperienceBuffer, AsyncPromptQueue
from instructrl.buffer.config import BufferConfig, Keys, RedisConfig
from instructrl.buffer.connection import async_redis_from_url, delete_run, redis_from_url
from instructrl.buffer.experience import Batch, ExperienceBuffer, read_dead_letters
from instructrl.buffer.prompts import ClaimedPrompts, PromptQueue, sample_id_for
from instructrl.buffer.streams import BufferFull
from instructrl.buffer.validate import PoisonRecord, check_experience, check_prompt

__all__ = [
    "AsyncExperienceBuffer", "AsyncPromptQueue", "Batch", "BufferConfig", "BufferFull",
    "ClaimedPrompts", "ExperienceBuffer", "Keys", "PoisonRecord", "PromptQueue", "RedisConfig",
    "async_redis_from_url", "check_experience", "check_prompt", "delete_run",
    "read_dead_letters", "redis_from_url", "sample_id_for",
]
