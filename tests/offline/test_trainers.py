"""The SFT, RM and DPO trainers on the tiny model, in process (one DeepSpeed gloo group)."""
from __future__ import annotations

import json

import pytest
import torch

from instructrl.config import from_dict
from instructrl.demo import task as T
from instructrl.offline import data as D
from instructrl.offline import dpo, output, rm, sft


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _sft_cfg(model, out, files, **train):
    return from_dict(sft.SFTConfig, {
        "model": str(model), "output_dir": str(out),
        "data": {"train_file": str(files["demos"]), "eval_file": str(files["demos_eval"])},
        "train": {"max_steps": 2, "micro_batch_size": 8, "progress": False, **train},
    })


def test_sft_loss_goes_down_and_saves_a_causal_lm(sft_run):
    from transformers import AutoModelForCausalLM

    out, final = sft_run
    lines = _metrics(out)
    train = [m["loss"] for m in lines if m.get("split") == "train"]
    evals = [m["loss"] for m in lines if m.get("split") == "eval"]
    assert len(evals) == 6 and evals[-1] < evals[0] < train[0]  # every 50 of 300 steps, and at the end
    assert train[-1] < 0.6 * train[0]
    assert final["eval_loss"] == evals[-1] and lines[-1]["event"] == "done"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert json.loads((out / "instructrl.json").read_text())["stage"] == "sft"
    assert not list(out.parent.glob("*.tmp-*"))


def test_sft_scores_response_tokens_only(tiny_model, task_files, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    seen, real = [], sft.lm_loss

    def spy(logits, labels, ignore_index=-100):
        seen.append(labels.clone())
        return real(logits, labels, ignore_index)

    monkeypatch.setattr(sft, "lm_loss", spy)
    one = T.write_jsonl(tmp_path / "one.jsonl", [{"prompt": "reverse: c a b =>", "response": " b a c"}])
    cfg = _sft_cfg(tiny_model, tmp_path / "out", {"demos": one, "demos_eval": one}, max_steps=1)
    sft.train(cfg)
    n_prompt = len(tok("reverse: c a b =>", add_special_tokens=False)["input_ids"])
    response = tok(" b a c", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = seen[0][0].tolist()
    assert labels == [-100] * n_prompt + response  # prompt positions are -100, EOS is scored


def test_failed_run_leaves_nothing_half_written(tiny_model, task_files, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "previous.txt").write_text("an older, complete checkpoint")

    def crash(module, tokenizer, stage, zero_stage, info):
        (stage / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(output, "save_hf", crash)
    with pytest.raises(OSError, match="disk full"):
        sft.train(_sft_cfg(tiny_model, out, task_files))
    assert [p.name for p in out.iterdir()] == ["previous.txt"]  # the old output is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["sft"]  # no staging dir left behind

    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        sft.train(_sft_cfg(tiny_model, fresh, task_files))
    assert not fresh.exists()


def test_bad_data_fails_before_writing(tiny_model, tmp_path, capsys):
    bad = tmp_path / "rank.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "responses": [" a", " b"]}) + "\n"
                   + json.dumps({"prompt": "p", "responses": [" a"]}) + "\n")
    rc = rm.main([f"model={tiny_model}", f"output_dir={tmp_path / 'rm'}", f"data.train_file={bad}"])
    assert rc == 2
    assert f"{bad}:2: field 'responses': K = 1" in capsys.readouterr().err
    assert not (tmp_path / "rm").exists()


def test_zero_stages_train_and_save_the_same_model(tiny_model, task_files, tmp_path):
    from transformers import AutoModelForCausalLM

    def run(zero_stage):
        cfg = _sft_cfg(tiny_model, tmp_path / f"z{zero_stage}", task_files, max_steps=4)
        cfg.deepspeed.zero_stage = zero_stage
        return sft.train(cfg)["eval_loss"]

    losses = {z: run(z) for z in (0, 2, 3)}
    assert losses[2] == pytest.approx(losses[0], rel=1e-5) and losses[3] == pytest.approx(losses[0], rel=1e-5)
    z0, z3 = (AutoModelForCausalLM.from_pretrained(tmp_path / f"z{z}").state_dict() for z in (0, 3))
    assert z3.keys() == z0.keys()  # ZeRO-3's partitioned parameters were gathered before saving
    for name, p in z0.items():
        assert torch.allclose(z3[name], p, atol=1e-5), name


def test_reward_model_starts_from_sft_backbone_and_scores_the_last_token(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = sft_run
    tok = AutoTokenizer.from_pretrained(out)
    lm = AutoModelForCausalLM.from_pretrained(out)
    model = rm.load_reward_model(str(out), tok.pad_token_id).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    for name, p in lm.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], p), name
    ex = [D.encode_pair(tok, "sort: b a =>", r, 32, True) for r in (" a b", " a b ok done thanks")]
    batch = D.collate_sequences(ex, tok.pad_token_id)
    with torch.no_grad():
        pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        per_token = model.score(hidden)[..., 0]  # (N, L)
    assert torch.allclose(pooled, per_token[torch.arange(2), batch["last_index"]], atol=1e-6)


def test_reward_model_learns_the_rankings(sft_run, task_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    sft_dir, _ = sft_run
    out = tmp_path / "rm"
    final = rm.train(from_dict(rm.RMConfig, {
        "model": str(sft_dir), "output_dir": str(out),
        "data": {"train_file": str(task_files["rankings"]), "eval_file": str(task_files["rankings_eval_gold"]),
                 "demonstrations_file": str(task_files["demos_eval"])},
        "train": {"epochs": 1, "micro_batch_size": 16, "progress": False},
        "optim": {"lr": 3e-4, "warmup_steps": 10},
    }))
    # held-out prompts, ranked by the gold score: a random scorer gets 0.5
    assert final["eval_accuracy"] > 0.6, final
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == 0
    info = json.loads((out / "instructrl.json").read_text())
    assert info["stage"] == "rm" and isinstance(info["reward_mean"], float)


def test_kwise_loss_gets_all_responses_of_a_prompt_in_one_row(sft_run, tmp_path, monkeypatch):
    records = (T.make_rankings(6, 0, T.TaskConfig(num_responses=2))
               + T.make_rankings(6, 1, T.TaskConfig(num_responses=5))
               + [{"prompt": "copy: a b =>", "chosen": " a b", "rejected": " a"}])
    path = T.write_jsonl(tmp_path / "mixed.jsonl", records)
    calls, real = [], rm.kwise_ranking_loss

    def spy(rewards, num_responses):
        calls.append((tuple(rewards.shape), num_responses.tolist()))
        return real(rewards, num_responses)

    monkeypatch.setattr(rm, "kwise_ranking_loss", spy)
    rm.train(from_dict(rm.RMConfig, {
        "model": str(sft_run[0]), "output_dir": str(tmp_path / "rm"),
        "data": {"train_file": str(path), "eval_fraction": 0.0},
        "train": {"epochs": 1, "micro_batch_size": 4, "progress": False}}))
    assert len(calls) == 4  # 13 prompts in micro-batches of 4 prompts
    assert sorted(k for _, ks in calls for k in ks) == [2] * 7 + [5] * 6  # every prompt once, all K responses
    for (b, k), ks in calls:
        assert b == len(ks) and k == max(ks)  # (B, K) with K the batch's largest, padding counted out


def test_dpo_raises_the_implicit_reward_margin(sft_run, task_files, tmp_path):
    out = tmp_path / "dpo"
    final = dpo.train(from_dict(dpo.DPOConfig, {
        "model": str(sft_run[0]), "output_dir": str(out),
        "data": {"train_file": str(task_files["pairs"]), "eval_file": str(task_files["pairs_eval"])},
        "dpo": {"beta": 0.1},
        "train": {"epochs": 2, "micro_batch_size": 8, "log_every": 1, "progress": False},
        "optim": {"lr": 3e-4, "warmup_steps": 5},
    }))
    train = [m for m in _metrics(out) if m.get("split") == "train"]
    assert train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-3)  # policy == reference before step 1
    late = sum(m["reward_margin"] for m in train[-10:]) / 10
    assert late > 0.1, late
    assert final["eval_reward_margin"] > 0.0 and final["eval_accuracy"] > 0.5, final
