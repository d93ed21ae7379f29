"""How the scoring services (reward, reference) load a checkpoint (dtype, attention kernel) and
the limits their requests are checked against (vocabulary, length).

- `dtype: auto` (the default) keeps a bf16/fp16 checkpoint in its own dtype on a GPU, where
  a 6B model then takes half the memory of float32 and runs on the tensor cores, and loads
  float32 on CPU (CPU kernels for half types are slow, and the tests compare with float32
  transformers to 1e-5). `float32`, `bfloat16`, `float16` force a dtype.
- `attn_implementation: sdpa` (the default): torch's fused scaled-dot-product attention,
  which every architecture we support has; `eager` for a model without it,
  `flash_attention_2` where that package is installed.

Scores and log-probs are computed in float32 whatever the weights' dtype (the last
projection's output is cast before the softmax / read-out).
The services batch by padded tokens (`serving/batcher.py`, `batching.max_batch_tokens`),
which bounds their activation memory; `bench/memory_6b.py` states the need of a 6B model.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import torch

from instructrl.config import ConfigError
from instructrl.serving.errors import InvalidArgument

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def checkpoint_dtype(model_dir: str | pathlib.Path) -> torch.dtype:
    """The dtype a checkpoint was saved in (`config.json`'s `dtype` / `torch_dtype`), float32 if unstated."""
    try:
        cfg = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def resolve_dtype(dtype: str, model_dir: str | pathlib.Path, device: str | torch.device) -> torch.dtype:
    """`auto`: the checkpoint's dtype on a GPU, float32 on CPU; otherwise the named dtype."""
    if dtype == "auto":
        return checkpoint_dtype(model_dir) if torch.device(device).type != "cpu" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_kwargs(model_dir: str, dtype: str, attn_implementation: str, device: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for a scoring service's model."""
    if attn_implementation not in ATTENTION:
        raise ConfigError(f"attn_implementation: {attn_implementation!r} is not one of {', '.join(ATTENTION)}")
    return {"dtype": resolve_dtype(dtype, model_dir, device), "attn_implementation": attn_implementation}


def load_scoring_model(auto_cls: Any, cfg: Any) -> Any:
    """`auto_cls.from_pretrained(cfg.model)` with the service config's dtype, attention kernel and
    device (`load_kwargs`); a ConfigError naming the model when it cannot be loaded."""
    try:
        return auto_cls.from_pretrained(cfg.model, **load_kwargs(cfg.model, cfg.dtype, cfg.attn_implementation,
                                                                 cfg.device))
    except OSError as e:
        raise ConfigError(f"model: cannot load {cfg.model!r}: {e}") from None


def sequence_limits(model: Any, max_seq_len: int) -> tuple[int, int, int]:
    """(vocabulary size, most tokens an item may have: `max_seq_len` or else the model's context
    length, pad id: the model's or else 0)."""
    text_cfg = model.config.get_text_config()
    pad_id = text_cfg.pad_token_id if text_cfg.pad_token_id is not None else 0
    return int(text_cfg.vocab_size), max_seq_len or int(text_cfg.max_position_embeddings), pad_id


def check_token_ids(ids: list[int], vocab_size: int, where: str) -> None:
    """InvalidArgument naming `where` and the position of the first id outside [0, vocab_size)."""
    for pos, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise InvalidArgument(f"{where}: token id {t} at position {pos} is outside the vocabulary "
                                  f"[0, {vocab_size})")
