"""Attention whose result for a query does not depend on the other queries (``kernels/attention.c``).

PyTorch's SDPA sums in blocks that follow the shapes of the call. A token verified inside a tree
and the same token decoded alone therefore get slightly different attention outputs: with the default
model's int4 weights the logits of an 8-token chain differed from one-token forwards' by up to 0.7
(w4a8: 1.3; ``docs/w4a8/``), so greedy speculative output could part from plain decoding at a near-tie.
:func:`invariant_attention` gathers each query's kept keys (mask above -1e30) in index order and sums
over that list in one fixed order, so the key order of an accepted path (compacted to positions,
:class:`~redrafter.kv_cache.TreeKVCache`) gives the same bits as the tree that proposed it. With
weight products that are batch-invariant too (int4, int8, w4a8), speculative decoding then equals
plain decoding token for token in bfloat16.
"""

from __future__ import annotations

import torch

from .kernels import kernel_refusal, library


def invariant_attention_refusal(dtype: torch.dtype, device: torch.device, head_dim: int) -> str | None:
    """Why :func:`invariant_attention` cannot run attention of these heads, or None when it can."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return "it runs on the CPU in bfloat16 or float32"
    if head_dim % 16 or head_dim > 256:
        return "it needs a head dimension that is a multiple of 16, at most 256"
    return kernel_refusal()


def invariant_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attn_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax(scale q k^T + mask) v`` per query, as SDPA with an additive mask computes it.

    Args:
        query: ``[B, H, Q, D]``.
        keys, values: ``[B, H, K, D]`` (views of a cache are fine: only ``D`` must be contiguous).
        attn_mask: additive ``[B or 1, 1, Q, K]`` (as SDPA's); keys at or below -1e30 are left out.
        scale: the scores' factor.
    Returns:
        ``[B, H, Q, D]`` in ``query``'s dtype (zeros for a query with no key left).
    """
    batch, heads, length, dim = query.shape
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    query, mask = query.contiguous(), attn_mask.to(query.dtype).contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    out = torch.empty(batch, heads, length, dim, dtype=query.dtype)
    mask_batch_stride = mask.stride(0) if mask.shape[0] > 1 else 0
    status = library().invariant_attention(
        query.data_ptr(), keys.data_ptr(), values.data_ptr(), mask.data_ptr(), query.dtype == torch.bfloat16,
        batch, heads, length, keys.shape[2], dim,
        *query.stride()[:3], *keys.stride()[:3], *values.stride()[:3], mask_batch_stride, mask.stride(2),
        scale, out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("invariant attention: no memory for its scratch") if status == -1 else ValueError(dim)
    return out
