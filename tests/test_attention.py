"""Attention whose result for a query does not depend on the other queries (redrafter.attention)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from redrafter.attention import invariant_attention
from redrafter.kernels import kernel_refusal

pytestmark = pytest.mark.skipif(kernel_refusal() is not None, reason=str(kernel_refusal()))


def inputs(dtype: torch.dtype, batch=2, heads=3, queries=5, keys=40, dim=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=generator).to(dtype)
    # keys and values as views of a longer cache, as the decode loop passes them
    k = torch.randn(batch, heads, keys + 10, dim, generator=generator).to(dtype)[:, :, :keys]
    v = torch.randn(batch, heads, keys + 10, dim, generator=generator).to(dtype)[:, :, :keys]
    allowed = torch.rand(batch, queries, keys, generator=generator) > 0.3
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
def test_a_querys_result_depends_only_on_its_own_keys_in_order(dtype):
    """A query alone over its kept keys alone (compacted, as an accepted path is in the cache) gets
    the bits it gets among other queries, with masked keys between and after its own."""
    q, k, v, mask, allowed = inputs(dtype, seed=1)
    together = invariant_attention(q, k, v, mask, 0.125)
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
