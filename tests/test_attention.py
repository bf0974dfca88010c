"""Attention whose result for a query does not depend on the other queries (redrafter.attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from redrafter.attention import invariant_attention
from redrafter.kernels import kernel_refusal

pytestmark = pytest.mark.skipif(kernel_refusal() is not None, reason=str(kernel_refusal()))


def inputs(dtype: torch.dtype, batch=2, heads=3, queries=5, keys=40, dim=64, seed=0, runs=False):
    """Random heads and a mask keeping 70% of the keys at random, or (``runs``) a context of kept keys
    from a random first one on, with a few left out: runs of sixteen (a fast path) at varying offsets."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=generator).to(dtype)
    # keys and values as views of a longer cache, as the decode loop passes them
    k = torch.randn(batch, heads, keys + 10, dim, generator=generator).to(dtype)[:, :, :keys]
    v = torch.randn(batch, heads, keys + 10, dim, generator=generator).to(dtype)[:, :, :keys]
    allowed = torch.rand(batch, queries, keys, generator=generator) > (0.03 if runs else 0.3)
    if runs:
        first = torch.randint(0, keys // 2, (batch, queries, 1), generator=generator)
        allowed &= torch.arange(keys) >= first
    allowed[..., 0] = True
    mask = torch.zeros(batch, queries, keys, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return q, k, v, mask, allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_computes_what_sdpa_computes(dtype):
    q, k, v, mask, _ = inputs(dtype)
    got = invariant_attention(q, k, v, mask, 0.125).float()
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7  # bfloat16: the output rounded once
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("runs", [False, True])
def test_a_querys_result_depends_only_on_its_own_keys_in_order(dtype, runs):
    """A query alone over its kept keys alone (compacted, as an accepted path is in the cache) gets
    the bits it gets among other queries, with masked keys between and after its own; whether its keys
    fall in runs of sixteen (scored together) or not (one by one) in either."""
    q, k, v, mask, allowed = inputs(dtype, keys=150 if runs else 40, seed=1, runs=runs)
    together = invariant_attention(q, k, v, mask, 0.125)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=0.125)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    assert torch.allclose(together.float(), expected, rtol=tolerance, atol=tolerance)
    for b, i in [(0, 0), (1, 2), (1, 4)]:
        kept = allowed[b, i].nonzero()[:, 0]
        alone_mask = torch.zeros(1, 1, 1, len(kept), dtype=dtype)
        alone = invariant_attention(
            q[b : b + 1, :, i : i + 1], k[b : b + 1, :, kept], v[b : b + 1, :, kept], alone_mask, 0.125
        )
        assert torch.equal(alone[0, :, 0], together[b, :, i])


def test_a_broadcast_mask_and_a_query_with_no_key():
    q, k, v, mask, _ = inputs(torch.float32, batch=2)
    shared = mask[:1].clone()
    shared[0, 0, 3] = torch.finfo(torch.float32).min  # query 3 sees nothing (a padding row): zeros
    got = invariant_attention(q, k, v, shared, 0.125)
    assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=shared.expand(2, -1, -1, -1), scale=0.125)
    assert torch.allclose(got[:, :, :3], expected[:, :, :3], atol=1e-5)
