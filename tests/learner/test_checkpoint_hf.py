"""The learner's HF checkpoint (actor_hf/) carries the prompt format of the model it was trained from
(issue 15): a reload, `instructrl sample` or a rollout engine started from the checkpoint formats
prompts as the SFT model's users did, not as raw text."""
from __future__ import annotations

import json
import pathlib

from learner_testkit import build_tiny, config, random_records

from instructrl.buffer import ExperienceBuffer
from instructrl.learner.loop import train
from instructrl.models import prompt_format

FORMAT = "Question: {prompt}\nAnswer:"


def test_actor_hf_keeps_the_sft_models_prompt_format(tmp_path, redis_url, run_id):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = pathlib.Path(build_tiny(tmp_path / "sft"))
    meta = json.loads((sft / "instructrl.json").read_text())
    (sft / "instructrl.json").write_text(json.dumps({**meta, "stage": "sft", "prompt_format": FORMAT}))
    cfg = config(tmp_path, str(sft), redis_url, run_id, batch_size=4, minibatch_size=4, micro_batch_size=4,
                 max_iterations=1)
    cfg.checkpoint.save_hf = True
    with ExperienceBuffer.open(cfg.buffer) as buf:
        buf.put(random_records(4, vocab=300, seed=0))
    assert train(cfg).policy_version == 1

    hf = tmp_path / "ckpt" / "iteration-00000001" / "actor_hf"
    assert prompt_format.of_model(hf) == FORMAT  # raw (the default) without the metadata file
    stored = json.loads((hf / "instructrl.json").read_text())
    assert stored["policy_version"] == 1 and stored["base_model"] == str(sft)
    AutoModelForCausalLM.from_pretrained(hf)  # a loadable HF directory, tokenizer included
    tok, sft_tok = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(sft)
    fmt = prompt_format.of_model(hf)
    assert prompt_format.encode_prompt(tok, "sort: 3 1 2 =>", fmt) == \
        prompt_format.encode_prompt(sft_tok, "sort: 3 1 2 =>", prompt_format.of_model(sft))
