"""Tiny Llama-architecture causal LMs and byte-level BPE tokenizers, built locally.

No model hub is reachable here (or in CI), so every test and the demo build their
models from a config: `build_tokenizer` trains a byte-level BPE on given text and
`build_tiny_llama` saves a randomly initialised `LlamaForCausalLM` next to it, as a
Hugging Face directory that transformers, vLLM (CPU and CUDA) and DeepSpeed load.

Head dim defaults to 64: vLLM's CPU attention accepts 32/64/128, not 16. Word
embeddings are untied by default: with tied embeddings vLLM-CPU keeps a stale
packed copy of lm_head after a live weight reload.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterable

from instructrl.config import field

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

# A small built-in corpus so that a tokenizer can be trained with no input at all.
DEFAULT_CORPUS = [
    "reverse: a b c d => d c b a",
    "sort: 3 1 2 => 1 2 3",
    "count the letters in hello => 5",
    "copy: the quick brown fox jumps over the lazy dog",
    "Instruction: write a short answer. Response: ok.",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


@dataclasses.dataclass
class TinyModelConfig:
    vocab_size: int = field(512, help="BPE vocabulary size (special tokens included)")
    hidden_size: int = field(128, help="model width")
    num_layers: int = field(2, help="decoder layers")
    num_heads: int = field(2, help="attention heads (head dim = hidden_size / num_heads; use 32, 64 or 128)")
    num_kv_heads: int = field(0, help="KV heads for GQA (0 = num_heads)")
    intermediate_size: int = field(0, help="MLP width (0 = 4 * hidden_size)")
    max_position_embeddings: int = field(512, help="context length")
    tie_word_embeddings: bool = field(False, help="tie lm_head to the embeddings (not advised with vLLM-CPU reloads)")
    seed: int = field(0, help="initialisation seed")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in (32, 64, 128, 256):
            raise ValueError(f"head dim {head_dim}: vLLM's CPU attention needs 32, 64, 128 or 256")


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | pathlib.Path):
    """Train a byte-level BPE tokenizer on `texts` and save it as a HF tokenizer in `out_dir`.

    Returns the `PreTrainedTokenizerFast`. Special tokens: pad, bos, eos (ids 0, 1, 2).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=None,
        clean_up_tokenization_spaces=False)
    fast.padding_side = "right"
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out_dir: str | pathlib.Path, cfg: TinyModelConfig | None = None,
                     texts: Iterable[str] | None = None, tokenizer=None):
    """Build and save a tiny `LlamaForCausalLM` (float32) plus its tokenizer in `out_dir`.

    The tokenizer is trained on `texts` (the built-in corpus when None) unless an
    existing `tokenizer` is given; the model's vocabulary is the tokenizer's length.
    Returns `(model, tokenizer)`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = cfg or TinyModelConfig()
    cfg.validate()
    out = pathlib.Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(texts if texts is not None else DEFAULT_CORPUS, cfg.vocab_size, out)
    else:
        tokenizer.save_pretrained(out)
    hf_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(hf_cfg).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "instructrl.json").write_text(json.dumps({"builder": "tiny_llama", **dataclasses.asdict(cfg)}, indent=2))
    return model, tokenizer
