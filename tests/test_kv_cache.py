"""The preallocated cache: writes in place, keeps accepted paths, grows when needed."""

from __future__ import annotations

import pytest
import torch

from redrafter.kernels import kernel_refusal
from redrafter.kv_cache import TreeKVCache


def test_keep_moves_the_accepted_path_next_to_the_context():
    cache = TreeKVCache(num_layers=2, capacity=4)
    context = torch.arange(2 * 3 * 3 * 2, dtype=torch.float32).view(2, 3, 3, 2)
    cache.update(context, -context, 0)
    cache.update(context, -context, 1)
    tree = torch.randn(2, 3, 5, 2)
    keys, _ = cache.update(tree, -tree, 0)
    cache.update(tree, -tree, 1)
    assert keys.shape == (2, 3, 8, 2) and cache.layers[0].capacity >= 8  # grew
    path = torch.tensor([[0, 2, 4], [0, 1, 1]])
    cache.keep(3, path)
    assert cache.length == 6
    for layer in cache.layers:
        assert torch.equal(layer.keys[:, :, :3], context)
        for row in range(2):
            assert torch.equal(layer.keys[row, :, 3:6], tree[row, :, path[row]])
            assert torch.equal(layer.values[row, :, 3:6], -tree[row, :, path[row]])
    # The next forward writes after the kept entries and sees exactly them.
    keys, _ = cache.update(torch.zeros(2, 3, 1, 2), torch.zeros(2, 3, 1, 2), 0)
    assert keys.shape[2] == 7


def test_keeping_the_first_entries_in_order_only_sets_the_length():
    cache = TreeKVCache(num_layers=2, capacity=16)
    tree = torch.randn(2, 3, 5, 2)
    for layer in range(2):
        cache.update(tree, -tree, layer)
    before = [layer.keys.clone() for layer in cache.layers]
    cache.keep(0, torch.tensor([[0, 1], [0, 1]]))
    assert cache.length == 2
    for layer, keys in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.keys, keys)  # nothing moved: entries 0 and 1 already sit there
    cache.keep(0, torch.tensor([[0, 1], [0, 1]])[:, :1])
    assert cache.length == 1


def test_select_rows_and_crop():
    cache = TreeKVCache(num_layers=1, capacity=8)
    cache.update(torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 4, 1), torch.zeros(3, 1, 4, 1), 0)
    cache.select_rows(torch.tensor([2, 0]))
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [2.0, 0.0]
    cache.crop(-2)  # the transformers 5 convention: a negative count
    assert cache.length == 2 and cache.get_seq_length() == 2


def test_reserve_grows_allocated_layers_and_keeps_their_entries():
    cache = TreeKVCache(num_layers=2, capacity=4)
    cache.reserve(100)  # nothing allocated yet: the first update allocates
    context = torch.randn(2, 3, 3, 2)
    cache.update(context, -context, 0)
    assert cache.layers[1].keys is None
    cache.reserve(9)
    assert cache.layers[0].capacity >= 9 and cache.layers[0].keys.shape[2] == cache.layers[0].capacity
    assert torch.equal(cache.layers[0].keys[:, :, :3], context) and cache.length == 3
    capacity = cache.layers[0].capacity
    cache.reserve(5)  # fits already: unchanged
    assert cache.layers[0].capacity == capacity


def test_gather_moves_each_rows_entries_to_the_front():
    cache = TreeKVCache(num_layers=2, capacity=8)
    entries = torch.randn(2, 3, 6, 2)
    for layer in range(2):
        cache.update(entries, -entries, layer)
    index = torch.tensor([[0, 4, 5], [1, 2, 5]])
    cache.gather(index)
    assert cache.length == 3
    for layer in cache.layers:
        for row in range(2):
            assert torch.equal(layer.keys[row, :, :3], entries[row, :, index[row]])
            assert torch.equal(layer.values[row, :, :3], -entries[row, :, index[row]])


@pytest.mark.skipif(kernel_refusal() is not None, reason=str(kernel_refusal()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_in_one_call_moves_what_each_layers_keep_moves(dtype):
    """The kernel's keep over all layers equals the layers' own, for paths of increasing slots whose
    rows accepted different counts (padding repeats a row's last slot)."""
    generator = torch.Generator().manual_seed(0)
    caches = [TreeKVCache(num_layers=3, capacity=16) for _ in range(2)]
    context, tree = torch.randn(3, 2, 5, 4, generator=generator), torch.randn(3, 2, 6, 4, generator=generator)
    for cache in caches:
        for layer in range(3):
            cache.update(context.to(dtype), -context.to(dtype), layer)
            cache.update((tree + layer).to(dtype), (-tree - layer).to(dtype), layer)
    path = torch.tensor([[0, 2, 3, 5], [0, 4, 4, 4], [0, 1, 2, 2]])
    assert caches[0]._keep_in_one_call(5, path)
    for layer in caches[1].layers:
        layer.keep(5, path)
    for one_call, per_layer in zip(caches[0].layers, caches[1].layers, strict=True):
        assert one_call.length == per_layer.length == 9
        assert torch.equal(one_call.keys[:, :, :9], per_layer.keys[:, :, :9])
        assert torch.equal(one_call.values[:, :, :9], per_layer.values[:, :, :9])
