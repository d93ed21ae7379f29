"""Tiny random-initialised causal LMs of the common Hugging Face architectures, built locally.

No model hub is reachable here (or in CI), so every test and the demo build their models
from a config: `build_tokenizer` trains a byte-level BPE on given text and `build_tiny` saves
a randomly initialised causal LM of an architecture next to it, as a Hugging Face directory
that transformers, vLLM (CPU and CUDA) and DeepSpeed load. `build_tiny_llama` is the Llama
default (`instructrl tiny-model`, the demo, most tests).

What users bring is rarely a Llama with a pad token: each architecture has the traits of its
real checkpoints that break naive pipelines:

| arch       | HF class              | embeddings | tokenizer pad | other trait                          |
|------------|-----------------------|------------|---------------|--------------------------------------|
| llama      | LlamaForCausalLM      | untied     | own pad token | -                                    |
| qwen2      | Qwen2ForCausalLM      | tied       | own pad token | GQA, q/k/v biases, a chat template   |
| mistral    | MistralForCausalLM    | untied     | none (= EOS)  | GQA                                  |
| gpt2       | GPT2LMHeadModel       | tied       | none (= EOS)  | Conv1D weights (in, out), learned    |
|            |                       |            |               | positions, `transformer.` prefix     |
| gpt_neox   | GPTNeoXForCausalLM    | untied     | own pad token | fused QKV, partial rotary, parallel  |
|            |                       |            |               | residual, `gpt_neox.`/`embed_out`    |

Head dim (hidden_size / num_heads) must be 32, 64, 128 or 256: vLLM's CPU attention accepts no
other. Tied embeddings work with vLLM reloads too: the rollout extension re-processes a tied LM
head after every weight reload.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable
from typing import Any

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

ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")
TIED = {"qwen2", "gpt2"}            # tie_word_embeddings, as their real small checkpoints do
NO_PAD_TOKEN = {"mistral", "gpt2"}  # tokenizers without a pad token: pad falls back to EOS
# A ChatML template (Qwen2.5-Instruct's shape) that writes the BOS special token itself
CHAT_TEMPLATES = {"qwen2": ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")}


@dataclasses.dataclass
class TinyModelConfig:
    vocab_size: int = field(512, help="BPE vocabulary size (special tokens included)")
    hidden_size: int = field(128, help="model width")
    num_layers: int = field(2, help="decoder layers")
    num_heads: int = field(2, help="attention heads (head dim = hidden_size / num_heads; use 32, 64 or 128)")
    num_kv_heads: int = field(0, help="KV heads where the architecture has GQA (llama, qwen2, mistral; 0 = num_heads)")
    intermediate_size: int = field(0, help="MLP width (0 = 4 * hidden_size)")
    max_position_embeddings: int = field(512, help="context length")
    tie_word_embeddings: bool | None = field(None, help="tie lm_head to the embeddings (None: as the architecture's "
                                                        "real checkpoints do: qwen2 and gpt2 tied)")
    initializer_range: float = field(0.02, help="init std (HF's default; a wider one, e.g. 0.1, gives clear "
                                                "greedy argmax margins)")
    seed: int = field(0, help="initialisation seed")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim not in (32, 64, 128, 256):
            raise ValueError(f"head dim {head_dim}: vLLM's CPU attention needs 32, 64, 128 or 256")


def build_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | pathlib.Path, pad_token: str | None = PAD):
    """Train a byte-level BPE tokenizer on `texts` and save it as a HF tokenizer in `out_dir`.

    Returns the `PreTrainedTokenizerFast`. Special tokens: pad, bos, eos (ids 0, 1, 2); with
    `pad_token=None` there is no pad token (as GPT-2's and Llama-3 base's): bos, eos (ids 0, 1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[t for t in SPECIAL_TOKENS if t != PAD or pad_token],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad_token, bos_token=BOS, eos_token=EOS, unk_token=None,
        clean_up_tokenization_spaces=False)
    fast.padding_side = "right"
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def hf_config(arch: str, tokenizer, cfg: TinyModelConfig):
    """The transformers config of a tiny `arch` model over `tokenizer`'s vocabulary."""
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    tied = arch in TIED if cfg.tie_word_embeddings is None else cfg.tie_word_embeddings
    ids: dict[str, Any] = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                           "tie_word_embeddings": tied, "initializer_range": cfg.initializer_range}
    h, n, mlp = cfg.hidden_size, cfg.num_heads, cfg.intermediate_size or 4 * cfg.hidden_size
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=h, n_layer=cfg.num_layers, n_head=n, n_inner=mlp,
                             n_positions=cfg.max_position_embeddings, **ids)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=h, num_hidden_layers=cfg.num_layers, num_attention_heads=n,
                                intermediate_size=mlp, max_position_embeddings=cfg.max_position_embeddings, **ids)
    llama_like = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return llama_like(hidden_size=h, num_hidden_layers=cfg.num_layers, num_attention_heads=n,
                      num_key_value_heads=cfg.num_kv_heads or n, head_dim=h // n, intermediate_size=mlp,
                      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5, **extra, **ids)


def build_tiny(arch: str, out_dir: str | pathlib.Path, cfg: TinyModelConfig | None = None,
               texts: Iterable[str] | None = None, tokenizer=None):
    """Build and save a tiny float32 `arch` causal LM and its tokenizer in `out_dir`.

    The tokenizer is trained on `texts` (the built-in corpus when None) unless an existing
    `tokenizer` is given; the model's vocabulary is the tokenizer's length. Returns
    `(model, tokenizer)`, the tokenizer as `AutoTokenizer` loads it from `out_dir`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or TinyModelConfig()
    cfg.validate()
    out = pathlib.Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(texts if texts is not None else DEFAULT_CORPUS, cfg.vocab_size, out,
                                    pad_token=None if arch in NO_PAD_TOKEN else PAD)
    if arch in CHAT_TEMPLATES:
        tokenizer.chat_template = CHAT_TEMPLATES[arch]
    tokenizer.save_pretrained(out)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, tokenizer, cfg), dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    # as every user loads it: transformers picks the tokenizer class by model type (Qwen2's splits digits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    # the vocabulary the tokenizer actually learned (a small corpus stops BPE short of the request)
    meta = {"builder": f"tiny_{arch}", **dataclasses.asdict(cfg), "vocab_size": len(tokenizer),
            "vocab_size_requested": cfg.vocab_size}
    (out / "instructrl.json").write_text(json.dumps(meta, indent=2))
    return model, tokenizer


def build_tiny_llama(out_dir: str | pathlib.Path, cfg: TinyModelConfig | None = None,
                     texts: Iterable[str] | None = None, tokenizer=None):
    """`build_tiny("llama", ...)`: the architecture of `instructrl tiny-model`'s default, the demo and most tests."""
    return build_tiny("llama", out_dir, cfg, texts, tokenizer)
