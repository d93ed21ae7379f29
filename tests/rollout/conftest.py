"""Shared fixtures: a tiny model on disk and rollout servers as real subprocesses.

Each server is `python -m instructrl.cli serve rollout ...` in its own session, so
teardown can stop it and vLLM's engine-core child together.
"""
from __future__ import annotations

import pathlib

import pytest
from rollout_process import RolloutProcess

from instructrl.models.tiny import TinyModelConfig, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny-policy")
    build_tiny_llama(d, TinyModelConfig(hidden_size=128, num_layers=2, num_heads=2, vocab_size=384, seed=0))
    return d


@pytest.fixture(scope="module")
def rollout_server_factory(tmp_path_factory):
    started: list[RolloutProcess] = []

    def start(model_dir: pathlib.Path, *overrides: str) -> RolloutProcess:
        log_path = tmp_path_factory.mktemp("rollout-log") / "server.log"
        p = RolloutProcess(model_dir, log_path, list(overrides))
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
