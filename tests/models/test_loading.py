"""How the reward and reference services load checkpoints: dtype auto, attention kernel; the 6B memory bench."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from instructrl.config import ConfigError
from instructrl.models import loading
from instructrl.models.tiny import TinyModelConfig
from instructrl.reference.config import ReferenceConfig
from instructrl.reference.scorer import LogProbsInput, ReferenceScorer
from instructrl.reward.config import RewardConfig
from instructrl.reward.scorer import ModelReward, ScoreInput

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = TinyModelConfig(vocab_size=300, hidden_size=64, num_heads=2, num_layers=1, max_position_embeddings=64)


@pytest.fixture(scope="module")
def bf16_reward_dir(tmp_path_factory):
    """A tiny reward model saved in bfloat16, as 6B checkpoints are."""
    from transformers import AutoModelForSequenceClassification

    from instructrl.reward.tiny import build_tiny_reward_model

    d = tmp_path_factory.mktemp("rm-bf16")
    build_tiny_reward_model(d, TINY)
    model = AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.bfloat16)
    for f in d.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(d)
    return d


def test_auto_keeps_a_half_checkpoint_on_gpu_and_loads_float32_on_cpu(bf16_reward_dir):
    assert loading.checkpoint_dtype(bf16_reward_dir) == torch.bfloat16
    assert loading.resolve_dtype("auto", bf16_reward_dir, "cuda") == torch.bfloat16
    assert loading.resolve_dtype("auto", bf16_reward_dir, "cuda:1") == torch.bfloat16
    assert loading.resolve_dtype("auto", bf16_reward_dir, "cpu") == torch.float32
    assert loading.resolve_dtype("float16", bf16_reward_dir, "cpu") == torch.float16
    with pytest.raises(ConfigError, match="dtype"):
        loading.resolve_dtype("fp8", bf16_reward_dir, "cpu")
    with pytest.raises(ConfigError, match="attn_implementation"):
        loading.load_kwargs(str(bf16_reward_dir), "auto", "magic", "cpu")


def test_services_load_with_the_configured_dtype_and_attention(bf16_reward_dir):
    reward = ModelReward(RewardConfig(model=str(bf16_reward_dir)))
    assert reward.model.dtype == torch.float32 and reward.model.config._attn_implementation == "sdpa"
    reward16 = ModelReward(RewardConfig(model=str(bf16_reward_dir), dtype="bfloat16", attn_implementation="eager"))
    assert reward16.model.dtype == torch.bfloat16 and reward16.model.config._attn_implementation == "eager"
    items, _ = reward.prepare([ScoreInput([5, 6, 7], [8, 9])])
    a, b = reward.forward(items)[0], reward16.forward(items)[0]
    assert isinstance(b, float) and abs(a - b) < 0.05  # bf16 weights, float32 read-out
    ref = ReferenceScorer(ReferenceConfig(model=str(bf16_reward_dir), dtype="bfloat16"))
    assert ref.model.dtype == torch.bfloat16
    out = ref.forward(ref.prepare([LogProbsInput([5, 6, 7, 8], 2)])[0])
    assert out[0].dtype.name == "float32" and out[0].shape == (2,)


def test_memory_bench_states_a_6b_models_need_without_allocating_it():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "memory_6b.py")], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["results"]}
    for kind in ("reward", "reference"):
        r = rows[kind]
        assert 5.5 < r["params_b"] < 6.5 and r["dtype"] == "bfloat16" and r["padded_tokens"] == 16384
        assert r["weights_gib"] == pytest.approx(r["params_b"] * 1e9 * 2 / 2**30, rel=0.01)
        assert 0.5 < r["activations_gib"] < 8 and r["total_gib"] < 20
