"""The reference scorer over the session's tiny SFT model (tests/conftest.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def reference_scorer(sft_model_dir):
    from instructrl.reference.config import ReferenceConfig
    from instructrl.reference.scorer import ReferenceScorer

    return ReferenceScorer(ReferenceConfig(model=str(sft_model_dir)))
