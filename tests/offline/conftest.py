"""A tiny model and synthetic-task data files shared by the offline-stage tests."""
from __future__ import annotations

import pathlib

import pytest

from instructrl.demo import task as T


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    """A randomly initialised 2-layer Llama (hidden 128) with a BPE tokenizer trained on the task corpus."""
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    out = tmp_path_factory.mktemp("base")
    cfg = TinyModelConfig(vocab_size=384, hidden_size=128, num_layers=2, num_heads=2)
    build_tiny_llama(out, cfg, T.tokenizer_corpus(n=500))
    return out


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Demonstrations, K-wise rankings and pairs: noisy labeler for training, gold order for held-out prompts."""
    d = tmp_path_factory.mktemp("data")
    clean = T.TaskConfig(labeler_noise=0.0)
    return {
        "demos": T.write_jsonl(d / "demos.jsonl", T.make_demonstrations(2000, seed=0)),
        "demos_eval": T.write_jsonl(d / "demos_eval.jsonl", [
            {"prompt": p, "response": T.answer(p)} for p in T.make_prompts(64, seed=0, split="eval")]),
        "rankings": T.write_jsonl(d / "rankings.jsonl", T.make_rankings(4000, seed=0)),
        "rankings_eval_gold": T.write_jsonl(d / "rankings_eval.jsonl",
                                            T.make_rankings(200, seed=0, cfg=clean, split="eval")),
        "pairs": T.write_jsonl(d / "pairs.jsonl", T.make_pairs(200, seed=0)),
        "pairs_eval": T.write_jsonl(d / "pairs_eval.jsonl", T.make_pairs(128, seed=0, cfg=clean, split="eval")),
    }


@pytest.fixture(scope="session")
def sft_run(tiny_model, task_files, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A short in-process SFT run of the tiny model on the demonstrations: (output dir, final metrics)."""
    from instructrl.config import from_dict
    from instructrl.offline import sft

    out = tmp_path_factory.mktemp("sft") / "model"
    cfg = from_dict(sft.SFTConfig, {
        "model": str(tiny_model), "output_dir": str(out),
        "data": {"train_file": str(task_files["demos"]), "eval_file": str(task_files["demos_eval"])},
        "train": {"max_steps": 300, "micro_batch_size": 32, "eval_every": 50, "log_every": 10, "progress": False},
        "optim": {"lr": 2e-3, "warmup_steps": 10},
    })
    return out, sft.train(cfg)
