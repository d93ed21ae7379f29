"""The reward scorer over the session's tiny reward model (tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reward_scorer(reward_model_dir):
    from instructrl.reward.config import RewardConfig
    from instructrl.reward.scorer import ModelReward

    return ModelReward(RewardConfig(model=str(reward_model_dir)))
