"""De-duplication, packing and the tree mask against a slow, obviously correct reference; the two
packers (host walk and device tensors) against each other."""

from __future__ import annotations

import pytest
import torch

from redrafter.tree import (
    PAD,
    AttentionWindows,
    additive_mask,
    build_tree,
    layer_masks,
    pack_on_device,
    pack_on_host,
    tree_allowed,
)
from redrafter.verify import verify


def reference_tree(beams: torch.Tensor):
    """Per row: a dict from prefix tuple to slot, filled beam by beam, depth by depth (PAD skipped)."""
    batch, width, length = beams.shape
    rows = []
    for b in range(batch):
        slot_of: dict[tuple[int, ...], int] = {}
        for w in range(width):
            real = [t for t in beams[b, w].tolist() if t != PAD]
            for j in range(len(real)):
                slot_of.setdefault(tuple(real[: j + 1]), len(slot_of))
        rows.append(slot_of)
    return rows


FIELDS = ("tokens", "depth", "ancestors", "node_index", "num_nodes")


def packed_both_ways(beams: torch.Tensor):
    """The tree :func:`build_tree` gives, after checking that both packers give it, field for field."""
    tree = build_tree(beams)
    for packer in (pack_on_host, pack_on_device):
        other = packer(beams)
        for name in FIELDS:
            assert torch.equal(getattr(other, name), getattr(tree, name)), (packer.__name__, name)
            assert getattr(other, name).dtype == getattr(tree, name).dtype, (packer.__name__, name)
    return tree


def check_against_reference(beams: torch.Tensor) -> None:
    tree = packed_both_ways(beams)
    reference = reference_tree(beams)
    batch, width, length = beams.shape
    assert tree.num_nodes.tolist() == [len(r) for r in reference]
    slots = tree.tokens.shape[1]
    assert slots == max(len(r) for r in reference)
    for b, slot_of in enumerate(reference):
        for w in range(width):
            for j in range(length):
                assert tree.node_index[b, w, j] == slot_of[tuple(beams[b, w, : j + 1].tolist())]
        expected = torch.eye(slots, dtype=torch.bool)
        for prefix, slot in slot_of.items():
            assert tree.tokens[b, slot] == prefix[-1]
            assert tree.depth[b, slot] == len(prefix) - 1
            for k in range(1, len(prefix) + 1):
                expected[slot, slot_of[prefix[:k]]] = True
        assert torch.equal(tree.ancestors[b], expected), f"row {b}"
        # Padding slots are roots that see only themselves.
        assert (tree.depth[b, len(slot_of) :] == 0).all()


def random_beams(batch: int, width: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    beams = torch.randint(0, vocab, (batch, width, length), generator=generator)
    beams[:, :, 0] = beams[:, :1, 0]  # every beam starts at the row's last token
    return beams


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("shape", [(3, 1, 1), (1, 1, 2), (2, 4, 5), (3, 5, 5), (2, 8, 3), (1, 3, 7)])
def test_shared_prefixes_match_reference(shape, seed):
    # A vocabulary of 3 makes shared prefixes (and duplicate beams) frequent.
    check_against_reference(random_beams(*shape, vocab=3, seed=seed))


@pytest.mark.parametrize("seed", range(5))
def test_all_distinct_beams(seed):
    beams = random_beams(2, 4, 5, vocab=10_000, seed=seed)
    check_against_reference(beams)
    assert build_tree(beams).num_nodes.tolist() == [1 + 4 * 4] * 2


def test_a_plain_step_packs_and_verifies_as_a_beam_of_the_root_alone():
    """A plain step's beams ``[B, 1, 1]`` take a shortcut in build_tree and verify; a beam of the root and a
    PAD tail takes the general path and must give the same tree and verdict."""
    roots = torch.tensor([4, 9, 2])
    plain, padded = roots[:, None, None], torch.stack([roots, torch.full_like(roots, PAD)], dim=1)[:, None, :]
    short, general = build_tree(plain), packed_both_ways(padded)
    for name in ("tokens", "depth", "ancestors", "num_nodes"):
        assert torch.equal(getattr(short, name), getattr(general, name)), name
    assert torch.equal(short.node_index, general.node_index[:, :, :1])
    choice = torch.tensor([[7], [1], [3]])
    fast, slow = verify(plain, short.node_index, choice), verify(padded, general.node_index, choice)
    assert torch.equal(fast.tokens, slow.tokens[:, :1]) and torch.equal(fast.num_tokens, slow.num_tokens)
    assert torch.equal(fast.path, slow.path[:, :1]) and fast.tokens[:, 0].tolist() == [7, 1, 3]


def test_all_beams_equal_is_one_path():
    beams = torch.tensor([5, 6, 7, 8]).expand(2, 3, 4).clone()
    check_against_reference(beams)
    tree = build_tree(beams)
    assert tree.num_nodes.tolist() == [4, 4]
    assert tree.tokens.tolist() == [[5, 6, 7, 8]] * 2
    assert torch.equal(tree.ancestors[0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_rows_of_different_sizes_are_padded():
    equal = torch.tensor([[1, 2, 3]] * 3)
    distinct = torch.tensor([[1, 2, 3], [1, 4, 5], [1, 6, 7]])
    beams = torch.stack([equal, distinct])
    check_against_reference(beams)
    assert build_tree(beams).num_nodes.tolist() == [3, 7]


def test_mask_combines_context_and_tree():
    beams = torch.tensor([[[1, 2, 3], [1, 4, 5]]])
    tree = build_tree(beams)
    context_valid = torch.tensor([[False, True, True]])  # one left-padding position
    mask = additive_mask(tree_allowed(tree.ancestors, context_valid), torch.float32)
    assert mask.shape == (1, 1, 5, 3 + 5)
    allowed = mask[0, 0] == 0
    assert not allowed[:, 0].any() and allowed[:, 1:3].all()
    assert torch.equal(allowed[:, 3:], tree.ancestors[0])
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_sliding_layers_see_keys_within_the_window_of_each_queries_own_position():
    beams = torch.tensor([[[1, 2, 3], [1, 4, 5]]])  # slots: root 1 (depth 0), 2, 3, 4, 5 (depths 1, 2, 1, 2)
    tree = build_tree(beams)
    context_valid = torch.tensor([[False, True, True, True, True]])
    context_positions = torch.tensor([[0, 0, 1, 2, 3]])  # left padding, then positions 0..3
    tree_positions = 4 + tree.depth  # [1, 5]
    allowed = tree_allowed(tree.ancestors, context_valid)
    keys = torch.cat([context_positions, tree_positions], dim=1)
    masks = layer_masks(allowed, tree_positions, keys, AttentionWindows(window=3, per_layer_type=True), torch.float64)
    full, sliding = (masks[name][0, 0] == 0 for name in ("full_attention", "sliding_attention"))
    assert torch.equal(full, allowed[0])
    for q in range(5):
        for k in range(10):
            near = 0 <= int(tree_positions[0, q]) - int(keys[0, k]) < 3
            assert bool(sliding[q, k]) == (bool(allowed[0, q, k]) and near), (q, k)
    assert sliding[0, :5].tolist() == [False, False, False, True, True]  # the root (at 4) sees positions 2, 3
    assert not sliding[2, :5].any()  # depth 2 (position 6) sees no context ...
    assert torch.equal(sliding[2, 5:], allowed[0, 2, 5:])  # ... only its ancestors (positions 4, 5) and itself
    alone = layer_masks(allowed, tree_positions, keys, AttentionWindows(window=3), torch.float64)
    assert torch.equal(alone, masks["sliding_attention"])  # every layer slides: one mask
    assert torch.equal(
        layer_masks(allowed, tree_positions, keys, AttentionWindows(), torch.float64), masks["full_attention"]
    )


@pytest.mark.parametrize("seed", range(30))
def test_padded_beams_take_no_slots(seed):
    generator = torch.Generator().manual_seed(seed)
    beams = random_beams(2, 5, 6, vocab=3, seed=seed)
    real_len = torch.randint(1, 7, (2, 5), generator=generator)
    beams[torch.arange(6)[None, None, :] >= real_len[:, :, None]] = PAD
    tree = packed_both_ways(beams)
    reference = reference_tree(beams)
    assert tree.num_nodes.tolist() == [len(r) for r in reference]
    for b, slot_of in enumerate(reference):
        for w in range(5):
            real = [t for t in beams[b, w].tolist() if t != PAD]
            for j in range(6):  # a padded token points at its beam's last real slot
                assert tree.node_index[b, w, j] == slot_of[tuple(real[: min(j, len(real) - 1) + 1])]
        expected = torch.eye(tree.tokens.shape[1], dtype=torch.bool)
        for prefix, slot in slot_of.items():
            assert tree.tokens[b, slot] == prefix[-1]
            for k in range(1, len(prefix) + 1):
                expected[slot, slot_of[prefix[:k]]] = True
        assert torch.equal(tree.ancestors[b], expected)
