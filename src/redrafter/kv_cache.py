"""A preallocated key/value cache that keeps only the accepted path of each step, in place.

Hugging Face's ``DynamicCache`` grows by concatenation, which copies the whole cache on every
forward pass, and the reference implementation clones it again after every verification. Here
each layer owns one buffer ``[B, H, capacity, D]``; a forward writes its new entries at
``[length, length + q)`` and attends to a view of ``[0, length + q)``. After verification,
:meth:`TreeKVCache.keep` moves the accepted tree nodes' entries (at most ``L`` of them) next to
the context and sets the new length: no copy of the context is ever made.

All rows of a batch share one length; rows that accepted fewer tokens than others are handled by
the decode loop (their extra entries are masked out), so the buffers stay rectangular.
"""

from __future__ import annotations

import ctypes

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .kernels import kernel_refusal, library


class ContiguousLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated buffer ``[B, H, capacity, D]``."""

    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make the buffers ``[B, H, capacity, D]`` now (zeros), where nothing wrote them yet: a kernel
        that writes them itself (:class:`redrafter.fused_layer.FusedLayers`) needs them first."""
        if not self.is_initialized:
            empty = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
            self.lazy_initialization(empty, empty)

    def _grow(self, needed: int) -> None:
        """Double the capacity until ``needed`` entries fit (amortized; rare)."""
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self.capacity = capacity

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key_states``/``value_states`` ``[B, H, q, D]`` after the cached entries.

        Returns views ``[B, H, length + q, D]`` of everything cached, new entries included.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` entries (transformers 5 convention: a negative count)."""
        self.length = max(0, self.length + min(tokens_to_remove, 0))

    def keep(self, start: int, source: torch.Tensor) -> None:
        """Keep, at ``[start, start + n)``, the entries now at ``start + source`` and drop the rest.

        ``source``: ``[B, n]`` offsets (relative to ``start``) of the entries to keep, per row.
        """
        n = source.shape[1]
        index = (start + source)[:, None, :, None]  # [B, 1, n, 1]
        for buffer in (self.keys, self.values):
            picked = buffer.gather(2, index.expand(-1, buffer.shape[1], -1, buffer.shape[-1]))
            buffer[:, :, start : start + n] = picked
        self.length = start + n

    def reset(self) -> None:
        self.length = 0

    def gather(self, index: torch.Tensor) -> None:
        """Keep, at ``[0, n)``, the entries now at ``index`` ``[B, n]`` (per row, any of ``[0, length)``)."""
        n = index.shape[1]
        index = index[:, None, :, None]  # [B, 1, n, 1]
        for buffer in (self.keys, self.values):
            buffer[:, :, :n] = buffer[:, :, : self.length].gather(
                2, index.expand(-1, buffer.shape[1], -1, buffer.shape[-1])
            )
        self.length = n

    def merge(self, other: ContiguousLayer) -> None:
        """Append ``other``'s rows; the shorter of the two is left-padded (zeros, which the decode
        loop masks out) so both end at one length."""
        length = max(self.length, other.length)
        capacity = length + max(self.capacity - self.length, other.capacity - other.length)
        for name in ("keys", "values"):
            mine, theirs = getattr(self, name), getattr(other, name)
            merged = mine.new_zeros(mine.shape[0] + theirs.shape[0], mine.shape[1], capacity, mine.shape[-1])
            merged[: mine.shape[0], :, length - self.length : length] = mine[:, :, : self.length]
            merged[mine.shape[0] :, :, length - other.length : length] = theirs[:, :, : other.length]
            setattr(self, name, merged)
        self.capacity, self.length = capacity, length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` ``[B']``."""
        if self.is_initialized:
            self.keys = self.keys[indices]
            self.values = self.values[indices]


class TreeKVCache(Cache):
    """A ``Cache`` of :class:`ContiguousLayer` s that every transformers 5 decoder accepts.

    Args:
        num_layers: the target's number of decoder layers.
        capacity: initial number of positions per layer (grown by doubling if exceeded).
    """

    def __init__(self, num_layers: int, capacity: int = 1024) -> None:
        super().__init__(layers=[ContiguousLayer(capacity) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Number of cached positions (the same in every layer)."""
        return self.layers[0].length

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Every layer's :meth:`ContiguousLayer.allocate`."""
        for layer in self.layers:
            layer.allocate(batch, heads, head_dim, dtype, device)

    def keep(self, start: int, source: torch.Tensor) -> None:
        """Compact every layer: see :meth:`ContiguousLayer.keep`. ``source``: ``[B, n]``.

        When every row keeps the first ``n`` new entries in order (plain decoding, or a path that
        was packed first), they are already in place: only the length changes.
        """
        n = source.shape[1]
        if torch.equal(source, torch.arange(n, device=source.device).expand_as(source)):
            for layer in self.layers:
                layer.length = start + n
            return
        if self._keep_in_one_call(start, source):
            return
        for layer in self.layers:
            layer.keep(start, source)

    def _keep_in_one_call(self, start: int, source: torch.Tensor) -> bool:
        """:meth:`keep` through one call of ``kernels/layer.c``'s ``kv_keep`` for every layer's keys and
        values, where the kernels run and the buffers are contiguous CPU tensors of one shape (else
        False: nothing done). The layers' own :meth:`ContiguousLayer.keep` is about eight tensor
        operations a layer: 0.9 ms for the default model's 30 layers in a decode step, 0.2 ms a step
        on average (docs/host-steps/ of the repository)."""
        first = self.layers[0]
        if not first.is_initialized or first.keys.device.type != "cpu" or kernel_refusal() is not None:
            return False
        buffers = [buffer for layer in self.layers for buffer in (layer.keys, layer.values)]
        shape, dtype = first.keys.shape, first.keys.dtype
        if not all(b.shape == shape and b.dtype == dtype and b.is_contiguous() for b in buffers):
            return False
        batch, heads, capacity, width = shape
        source = source.to(torch.long).contiguous()
        pointers = (ctypes.c_void_p * len(buffers))(*(b.data_ptr() for b in buffers))
        n, size = source.shape[1], first.keys.element_size()
        library().kv_keep(pointers, len(buffers), batch, heads, capacity, width, size, start, source.data_ptr(), n)
        for layer in self.layers:
            layer.length = start + n
        return True

    def gather(self, index: torch.Tensor) -> None:
        """Keep, at ``[0, n)``, the entries now at ``index`` ``[B, n]`` in every layer (a continuous
        batch drops the entries its rows no longer need: see ``RunningBatch``)."""
        for layer in self.layers:
            layer.gather(index)

    def merge(self, other: TreeKVCache) -> None:
        """Append ``other``'s rows (left-padding the shorter cache): see :meth:`ContiguousLayer.merge`."""
        for layer, theirs in zip(self.layers, other.layers, strict=True):
            layer.merge(theirs)

    def reserve(self, needed: int) -> None:
        """Grow every allocated layer to hold ``needed`` entries now (a compiled forward would
        otherwise grow it inside, in a graph of its own)."""
        for layer in self.layers:
            if layer.is_initialized and needed > layer.capacity:
                layer._grow(needed)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` ``[B']`` (finished rows leave the batch)."""
        for layer in self.layers:
            layer.batch_select_indices(rows)
