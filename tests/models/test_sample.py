"""`instructrl sample`: JSONL completions of a checkpoint through vLLM (CPU), checked against transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "instructrl.cli", "sample", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from instructrl.models.tiny import TinyModelConfig, build_tiny_llama

    out = tmp_path_factory.mktemp("sample") / "m"
    build_tiny_llama(out, TinyModelConfig(hidden_size=64, num_heads=1, num_layers=1, seed=3))
    return out


def test_bad_input_names_the_flag(tmp_path, model):
    r = _cli("--model", str(tmp_path / "nope"), "--prompts", "x.jsonl")
    assert r.returncode == 2 and "--model" in r.stderr and "config.json" in r.stderr
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    r = _cli("--model", str(model), "--prompts", str(tmp_path / "p.jsonl"))
    assert r.returncode == 2 and "p.jsonl:2: field 'prompt'" in r.stderr
    r = _cli("--model", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr
    r = _cli("--model", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--n", "2", "--temperature", "0")
    assert r.returncode == 2 and "--n: greedy" in r.stderr


def test_prompts_take_the_format_stored_with_the_model(tmp_path, model):
    """A learner checkpoint keeps its SFT model's prompt format (instructrl.json): `sample` applies it."""
    import shutil

    from transformers import AutoTokenizer

    from instructrl.models import prompt_format
    from instructrl.models.sample import prompt_ids

    ckpt = tmp_path / "actor_hf"
    shutil.copytree(model, ckpt)
    (ckpt / "instructrl.json").write_text(json.dumps({"prompt_format": "Question: {prompt}\nAnswer:"}))
    tok = AutoTokenizer.from_pretrained(ckpt)
    fmt = prompt_format.resolve("", ckpt)
    assert prompt_ids(str(ckpt), [{"prompt": "sort: 3 1 2 =>"}], fmt) == \
        [tok("Question: sort: 3 1 2 =>\nAnswer:", add_special_tokens=False).input_ids]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    r = _cli("--model", str(ckpt), "--prompts", str(tmp_path / "p.jsonl"), "--prompt-format", "Q: {x}")
    assert r.returncode == 2 and "--prompt-format" in r.stderr


@pytest.mark.slow
def test_sample_writes_every_completion_and_greedy_matches_transformers(tmp_path, model):
    prompts = ["reverse: a b c =>", "sort: 3 1 2 =>", "copy: the quick"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "prompt_id": f"q{i}", "metadata": {"k": "v"}})
                                              + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    r = _cli("--model", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--n", "2", "--temperature", "1.0",
             "--max-tokens", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["prompt_id"], x["index"]) for x in rows] == [(f"q{i}", k) for i in range(3) for k in range(2)]
    assert all(x["metadata"] == {"k": "v"} and 1 <= len(x["token_ids"]) <= 6 for x in rows)
    assert "wrote 6 completions of 3 prompts" in r.stderr
    r = _cli("--model", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--temperature", "0", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    greedy = [json.loads(x) for x in r.stdout.splitlines()]  # --out -: stdout
    assert [x["prompt_id"] for x in greedy] == ["q0", "q1", "q2"]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = lm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
        want = gen[0, ids.shape[1]:].tolist()
        assert greedy[i]["token_ids"] == want, (p, greedy[i], want)
        assert tok.decode(want).startswith(greedy[i]["completion"].rstrip("\ufffd"))
