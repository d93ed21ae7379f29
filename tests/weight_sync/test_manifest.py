"""Bucket planning and packing (no processes, no network)."""
from __future__ import annotations

import math

import pytest
import torch

from instructrl.weight_sync import ALIGN, plan_buckets, total_bytes
from instructrl.weight_sync.manifest import pack_into, params_by_bucket, unpack, validate


def _meta(sizes, dtype=torch.float32):
    return [(f"p{i}", dtype, (n,)) for i, n in enumerate(sizes)]


def test_buckets_respect_the_cap_and_keep_order():
    m = plan_buckets(_meta([100, 200, 300, 50, 400, 10]), bucket_bytes=1024)  # fp32: 400, 800, ... bytes
    assert [p.name for p in m.params] == [f"p{i}" for i in range(6)]
    assert [p.bucket for p in m.params] == sorted(p.bucket for p in m.params)  # never goes back
    for b, group in zip(m.buckets, params_by_bucket(m), strict=True):
        assert b.nbytes <= 1024 or len(group) == 1  # p2 (1200 B) alone
    for p in m.params:
        assert p.offset % ALIGN == 0 and p.nbytes == math.prod(p.shape) * 4
        assert p.offset + p.nbytes <= m.buckets[p.bucket].nbytes
    validate(m)


def test_oversized_param_gets_its_own_bucket_and_is_never_split():
    m = plan_buckets(_meta([10, 1000, 10]), bucket_bytes=256)
    assert [p.bucket for p in m.params] == [0, 1, 2]
    assert m.buckets[1].nbytes == 4000 and len(m.buckets) == 3


def test_params_share_a_bucket_until_full_and_slices_do_not_overlap():
    m = plan_buckets(_meta([16] * 10), bucket_bytes=4 * ALIGN)  # 64 B each, aligned: 4 per bucket
    assert [len(g) for g in params_by_bucket(m)] == [4, 4, 2]
    for group in params_by_bucket(m):
        spans = sorted((p.offset, p.offset + p.nbytes) for p in group)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert total_bytes(m) == sum(b.nbytes for b in m.buckets)


def test_mixed_dtypes_round_trip_through_pack_and_unpack():
    g = torch.Generator().manual_seed(0)
    named = [("w", torch.randn(7, 5, generator=g)), ("b", torch.randn(3, generator=g).to(torch.bfloat16)),
             ("h", torch.randn(2, 3, generator=g).half()), ("step", torch.tensor(7, dtype=torch.int64)),
             ("t", torch.randn(4, 6, generator=g).t())]  # non-contiguous
    m = plan_buckets([(n, t.dtype, tuple(t.shape)) for n, t in named], bucket_bytes=128)
    validate(m)
    out = {}
    for b, group in zip(m.buckets, params_by_bucket(m), strict=True):
        buf = torch.zeros(b.nbytes, dtype=torch.uint8)
        pack_into(buf, group, [dict(named)[p.name] for p in group])
        out.update(unpack(buf, group))
    for n, t in named:
        assert out[n].dtype == t.dtype and out[n].shape == t.shape and torch.equal(out[n], t)


def test_bad_inputs():
    with pytest.raises(ValueError):
        plan_buckets(_meta([1, 1]) + [("p0", torch.float32, (1,))], 1024)
    with pytest.raises(ValueError):
        plan_buckets(_meta([1]), 0)
    assert len(plan_buckets([], 1024).buckets) == 0
    m = plan_buckets(_meta([8, 8]), 1024)
    with pytest.raises(ValueError):
        pack_into(torch.zeros(m.buckets[0].nbytes, dtype=torch.uint8), list(m.params),
                  [torch.zeros(8), torch.zeros(9)])
    m.params[1].offset += 4  # misaligned
    with pytest.raises(ValueError):
        validate(m)
    m = plan_buckets(_meta([8]), 1024)
    m.params[0].nbytes = 1
    with pytest.raises(ValueError):
        validate(m)
