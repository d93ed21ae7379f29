"""GPU memory of a 6B-parameter reward model and reference model, computed without allocating them.

The model is built on torch's `meta` device from a config (no weights exist, nothing is
downloaded), in the dtype the services load it in on a GPU (`dtype: auto`: a bf16
checkpoint stays bf16), and one forward pass at the services' default batch
(`batching.max_batch_tokens` = 16384 padded tokens, e.g. 32 sequences of 512) runs on meta
tensors under a dispatch mode that adds up the bytes of every tensor the pass creates and
subtracts them when the tensor is freed: the peak of that sum is the activation memory of
the pass (eager PyTorch, SDPA attention; allocator rounding, CUDA context (~0.5 GiB) and
kernel workspaces not included).

- reward: the backbone on every token, the scalar head on the last one (the reward service);
- reference: backbone + LM head on every token, then per item its rows cast to float32 and
  log-softmaxed (the reference service; worst case: the whole sequence is response).

    python bench/memory_6b.py [--batch 32 --seq 512] [--dtype bfloat16]   # one JSON line
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1 << 30

# A Llama-architecture 6B: GPT-J/InstructGPT-RM scale (28 layers of width 4096, Llama-2's MLP and vocabulary).
CONFIG_6B: dict[str, Any] = dict(hidden_size=4096, num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                 tie_word_embeddings=False, pad_token_id=0)


class PeakBytes(TorchDispatchMode):
    """Live and peak bytes of the tensors created under it (views and in-place results not counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def meta_model(kind: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    cfg = LlamaConfig(**CONFIG_6B)
    cfg.num_labels = 1
    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


@torch.inference_mode()
def measure(kind: str, batch: int, seq: int, dtype: torch.dtype) -> dict:
    import transformers.masking_utils as mu

    from instructrl.models.reward_head import rewards_at_last_token

    # meta tensors have no values: the packed-sequence probe (a data-dependent `.item()`) cannot run;
    # the services' batches are plain right-padded rows, never packed
    mu.find_packed_sequence_indices = lambda position_ids: None
    model = meta_model(kind, dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    lengths = torch.full((batch,), seq, dtype=torch.long, device="meta")
    mode = PeakBytes()
    with mode:
        if kind == "reward":
            out = rewards_at_last_token(model, ids, lengths, None)                        # (B,)
        else:
            logits = model(input_ids=ids, use_cache=False).logits                        # (B, L, V)
            for i in range(batch):  # as ReferenceScorer.forward: one item's rows in float32 at a time
                rows = logits[i, :-1].float()                                             # (L-1, V)
                lp = torch.log_softmax(rows, dim=-1).gather(-1, ids[i, 1:, None]).squeeze(-1)  # (L-1,)
                del rows, lp
            out = logits
        del out
    return {"model": kind, "params_b": round(params / 1e9, 3), "dtype": str(dtype).removeprefix("torch."),
            "weights_gib": round(weight_bytes / GiB, 2), "activations_gib": round(mode.peak / GiB, 2),
            "total_gib": round((weight_bytes + mode.peak) / GiB, 2), "batch": batch, "seq": seq,
            "padded_tokens": batch * seq}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="sequences per forward pass")
    ap.add_argument("--seq", type=int, default=512, help="padded length (batch x seq = max_batch_tokens 16384)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [measure(kind, args.batch, args.seq, dtype) for kind in ("reward", "reference")]
    print(json.dumps({"bench": "memory_6b", "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
