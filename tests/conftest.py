"""Fixtures shared by the whole suite. Keep this file short: helpers live in modules
next to it (redis_server.py)."""
from __future__ import annotations

import os
import uuid

import pytest
import redis_server as rs


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """URL of a real Redis: $INSTRUCTRL_TEST_REDIS_URL, else 127.0.0.1:6379 when it answers,
    else a private redis-server started for the session. Use with `run_id` so each test
    has its own namespace; never FLUSHDB (the server may be shared)."""
    url = os.environ.get(rs.URL_ENV)
    if url:
        yield url
        return
    if rs.reachable(rs.SHARED_URL):
        yield rs.SHARED_URL
        return
    try:
        server = rs.RedisServer(tmp_path_factory.mktemp("redis")).start()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield server.url
    server.stop()


@pytest.fixture
def run_id(redis_url):
    """A unique run id (Redis namespace) for this test; its keys are deleted afterwards."""
    rid = f"test-{uuid.uuid4().hex[:12]}"
    yield rid
    rs.delete_namespace(redis_url, rid)


@pytest.fixture
def aof_redis(tmp_path):
    """A private redis-server with appendonly yes + appendfsync always, for restart tests:
    `.kill()` / `.stop()` then `.start()` again on the same port and files."""
    try:
        server = rs.RedisServer(tmp_path / "redis-aof", appendonly=True).start()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield server
    server.stop()


# Tiny models built once per session, shared by the reward, reference and serving tests.
_TINY = dict(vocab_size=300, hidden_size=64, num_heads=2, num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory):
    """A tiny reward model in our RM format."""
    from instructrl.models.tiny import TinyModelConfig
    from instructrl.reward.tiny import build_tiny_reward_model

    d = tmp_path_factory.mktemp("tiny_reward_model")
    build_tiny_reward_model(d, TinyModelConfig(**_TINY))
    return d


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    """A tiny SFT (causal LM) model."""
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    d = tmp_path_factory.mktemp("tiny_sft_model")
    build_tiny_llama(d, TinyModelConfig(**_TINY))
    return d
