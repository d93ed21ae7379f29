"""A tiny reward model in the format our RM stage saves, for tests, benchmarks and the demo.

`LlamaForSequenceClassification` with `num_labels=1` and `pad_token_id` set, initialised
from a tiny causal LM (as InstructGPT initialises its RM from the SFT model) with a
freshly seeded scalar head, saved with its tokenizer as a Hugging Face directory.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable

from instructrl.models.tiny import TinyModelConfig, build_tiny_llama


def build_tiny_reward_model(out_dir: str | pathlib.Path, cfg: TinyModelConfig | None = None,
                            texts: Iterable[str] | None = None):
    """Build and save the reward model in `out_dir`; returns `(model, tokenizer)`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = cfg or TinyModelConfig()
    out = pathlib.Path(out_dir)
    _, tokenizer = build_tiny_llama(out, cfg, texts)
    torch.manual_seed(cfg.seed + 1)
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1, dtype=torch.float32)
    with torch.no_grad():  # a head with O(1) outputs, so that tests compare non-trivial numbers
        model.score.weight.normal_(0.0, 1.0 / cfg.hidden_size ** 0.5)
    model.config.pad_token_id = tokenizer.pad_token_id
    for f in out.glob("*.safetensors"):
        f.unlink()
    model.save_pretrained(out, safe_serialization=True)
    meta = json.loads((out / "instructrl.json").read_text())
    (out / "instructrl.json").write_text(json.dumps({**meta, "builder": "tiny_reward_model"}, indent=2))
    return model.eval(), tokenizer
