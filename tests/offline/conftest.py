"""A tiny model and synthetic-task data files shared by the offline-stage tests."""
from __future__ import annotations

import pathlib

import pytest

from instructrl.demo import task as T

# run-as-subprocess tests must not inherit the single-process rendezvous that an
# in-process train() wrote into os.environ
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A randomly initialised 2-layer Llama (hidden 64) with a BPE tokenizer trained on the task corpus."""
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    out = tmp_path_factory.mktemp("base")
    cfg = TinyModelConfig(vocab_size=384, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
    build_tiny_llama(out, cfg, T.tokenizer_corpus(n=500))
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Demonstrations, K-wise rankings (noisy labeler) and pairs for train and held-out prompts."""
    d = tmp_path_factory.mktemp("data")
    clean = T.TaskConfig(labeler_noise=0.0)
    return {
        "demos": T.write_jsonl(d / "demos.jsonl", T.make_demonstrations(600, seed=0)),
        "demos_eval": T.write_jsonl(d / "demos_eval.jsonl", [
            {"prompt": p, "response": T.answer(p)} for p in T.make_prompts(64, seed=0, split="eval")]),
        "rankings": T.write_jsonl(d / "rankings.jsonl", T.make_rankings(600, seed=0)),
        "rankings_eval_gold": T.write_jsonl(d / "rankings_eval.jsonl",
                                            T.make_rankings(100, seed=0, cfg=clean, split="eval")),
        "pairs": T.write_jsonl(d / "pairs.jsonl", T.make_pairs(200, seed=0)),
        "pairs_eval": T.write_jsonl(d / "pairs_eval.jsonl", T.make_pairs(64, seed=0, split="eval")),
    }
