"""A tiny reward model (our RM format) built once per test session."""
from __future__ import annotations

import pytest

from instructrl.models.tiny import TinyModelConfig

TINY = TinyModelConfig(vocab_size=300, hidden_size=64, num_heads=2, num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory):
    from instructrl.reward.tiny import build_tiny_reward_model

    d = tmp_path_factory.mktemp("tiny_reward_model")
    build_tiny_reward_model(d, TINY)
    return d


@pytest.fixture(scope="session")
def reward_scorer(reward_model_dir):
    from instructrl.reward.config import RewardConfig
    from instructrl.reward.scorer import ModelReward

    return ModelReward(RewardConfig(model=str(reward_model_dir)))
