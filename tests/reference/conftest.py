"""A tiny SFT (causal LM) model built once per test session."""
from __future__ import annotations

import pytest

from instructrl.models.tiny import TinyModelConfig

TINY = TinyModelConfig(vocab_size=300, hidden_size=64, num_heads=2, num_layers=2, max_position_embeddings=128)


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory):
    from instructrl.models.tiny import build_tiny_llama

    d = tmp_path_factory.mktemp("tiny_sft_model")
    build_tiny_llama(d, TINY)
    return d


@pytest.fixture(scope="session")
def reference_scorer(sft_model_dir):
    from instructrl.reference.config import ReferenceConfig
    from instructrl.reference.scorer import ReferenceScorer

    return ReferenceScorer(ReferenceConfig(model=str(sft_model_dir)))
