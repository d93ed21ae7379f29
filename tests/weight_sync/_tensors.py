"""The tensors both ranks of the transport tests agree on (built from a seed, never sent as objects)."""
from __future__ import annotations

import torch

BUCKET_BYTES = 64 * 1024


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(12):
        t = torch.randn(100 + 13 * i, 41, generator=g)
        out.append((f"layer{i}.weight", t.to(torch.bfloat16) if i % 3 == 0 else t))
    out.append(("big", torch.randn(200, 200, generator=g)))  # 160 KB: a bucket of its own
    out.append(("scalar", torch.tensor(3, dtype=torch.int64)))
    return out
