"""Dynamic tree attention: de-duplicate beams into a prefix tree and pack it for one forward pass.

Beams ``[B, W, L]`` share prefixes (all share token 0, the last token the target produced). A
token at depth ``j`` of beam ``w`` belongs to the earliest beam with the same prefix ``0..j``;
the unique tokens are packed, beam by beam, into one sequence of ``N`` slots per row. Every slot
attends to the cached context and to its own ancestors, and sits at position ``context + depth``.
A beam may be shorter than ``L``: its tail holds ``-1`` (:data:`PAD`), which takes no slot and
never matches the target's choice.

Two ways to pack, with the same result: batched tensor arithmetic with no Python loop over rows,
beams or depths (:func:`pack_on_device`, for accelerators: nothing leaves the device), and a walk over
the beams as Python lists (:func:`pack_on_host`, for beams on the CPU). A decode step's tree is a few
dozen tokens: on a CPU the two dozen tensor operations cost more than the walk, 0.36 against 0.08 ms a
step of the default model's decode loop on a 2-core CPU. :func:`build_tree` picks by the beams' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1
"""Token id of the unused tail of a beam shorter than the others."""


@dataclass(frozen=True)
class AttentionWindows:
    """Which of a target's layers see a sliding window of the context.

    Attributes:
        window: a sliding layer's query at position ``p`` sees keys at ``p - window < k <= p``;
            None: every layer sees the whole context.
        per_layer_type: the decoder takes one mask per layer type (``layer_types`` in its config:
            ``full_attention`` and ``sliding_attention``); otherwise every layer slides.
    """

    window: int | None = None
    per_layer_type: bool = False


@dataclass
class PackedTree:
    """A batch of prefix trees packed into sequences.

    Attributes:
        tokens: ``[B, N]`` token ids in packed order (padding slots hold the root token).
        depth: ``[B, N]`` depth of each slot in its tree (0 for the root and for padding).
        ancestors: ``[B, N, N]`` bool, ``ancestors[b, i, k]``: slot ``i`` may attend to slot ``k``
            (its ancestors and itself; padding slots see only themselves).
        node_index: ``[B, W, L]`` packed slot of each beam token (shared prefixes share a slot; a
            :data:`PAD` token gets its beam's last real slot).
        num_nodes: ``[B]`` number of real (non-padding) slots per row.
    """

    tokens: torch.Tensor
    depth: torch.Tensor
    ancestors: torch.Tensor
    node_index: torch.Tensor
    num_nodes: torch.Tensor


def prefix_representative(beams: torch.Tensor) -> torch.Tensor:
    """For each beam token, the earliest beam that has the same prefix up to that depth.

    Args:
        beams: ``[B, W, L]`` token ids.
    Returns:
        ``[B, W, L]`` beam index ``w' <= w`` with ``beams[b, w', :j+1] == beams[b, w, :j+1]``.
    """
    same_token = beams[:, :, None, :] == beams[:, None, :, :]  # [B, W, W', L]
    same_prefix = same_token.long().cumprod(dim=-1).bool()
    # argmax of a bool returns the first True; w' = w is always True.
    return same_prefix.int().argmax(dim=2)


def build_tree(beams: torch.Tensor) -> PackedTree:
    """De-duplicate ``beams`` ``[B, W, L]`` into prefix trees and pack them.

    ``N = max_b num_nodes[b]``, at most ``1 + W (L - 1)`` when every beam starts with the same token.
    Token 0 of every beam must be real; later ones may be :data:`PAD` (a tail, not a hole).
    Beams on the CPU are packed by :func:`pack_on_host`, others by :func:`pack_on_device`.
    """
    batch, width, length = beams.shape
    device = beams.device
    if width == 1 and length == 1:  # a plain step: the root alone
        return PackedTree(
            tokens=beams[:, 0],
            depth=torch.zeros(batch, 1, dtype=torch.long, device=device),
            ancestors=torch.ones(batch, 1, 1, dtype=torch.bool, device=device),
            node_index=torch.zeros(batch, 1, 1, dtype=torch.long, device=device),
            num_nodes=torch.ones(batch, dtype=torch.long, device=device),
        )
    return pack_on_host(beams) if device.type == "cpu" else pack_on_device(beams)


def pack_on_host(beams: torch.Tensor) -> PackedTree:
    """:func:`build_tree` by a walk over each row's beams as Python lists: a prefix takes the next slot
    when first seen, and a slot sees its parent's ancestors and itself. For beams on the CPU."""
    batch = beams.shape[0]
    rows = beams.tolist()
    tokens, depth, node_index, counts = [], [], [], []
    sees_row, sees_slot, sees_key = [], [], []  # the True entries of ``ancestors``
    for b, row in enumerate(rows):
        slot_of: dict[tuple[int, ...], int] = {}
        row_tokens, row_depth, row_index, lineage = [], [], [], []  # lineage[slot]: its ancestors, itself last
        for beam in row:
            slots: list[int] = []
            for j, token in enumerate(beam):
                if token == PAD:
                    slots.append(slots[-1])
                    continue
                prefix = tuple(beam[: j + 1])
                slot = slot_of.get(prefix)
                if slot is None:
                    slot = slot_of[prefix] = len(row_tokens)
                    row_tokens.append(token)
                    row_depth.append(j)
                    lineage.append([*lineage[slots[-1]], slot] if slots else [slot])
                slots.append(slot)
            row_index.append(slots)
        for slot, seen in enumerate(lineage):
            sees_row += [b] * len(seen)
            sees_slot += [slot] * len(seen)
            sees_key += seen
        tokens.append(row_tokens)
        depth.append(row_depth)
        node_index.append(row_index)
        counts.append(len(row_tokens))
    num_slots = max(counts)
    for b, count in enumerate(counts):  # padding slots: the root token at depth 0, seeing itself
        tokens[b] += [rows[b][0][0]] * (num_slots - count)
        depth[b] += [0] * (num_slots - count)
        sees_row += [b] * (num_slots - count)
        sees_slot += range(count, num_slots)
        sees_key += range(count, num_slots)
    ancestors = torch.zeros(batch, num_slots, num_slots, dtype=torch.bool)
    ancestors[sees_row, sees_slot, sees_key] = True
    return PackedTree(
        tokens=torch.tensor(tokens, dtype=beams.dtype),
        depth=torch.tensor(depth),
        ancestors=ancestors,
        node_index=torch.tensor(node_index),
        num_nodes=torch.tensor(counts),
    )


def pack_on_device(beams: torch.Tensor) -> PackedTree:
    """:func:`build_tree` in batched tensor arithmetic, on the beams' device."""
    batch, width, length = beams.shape
    device = beams.device
    beam_ids = torch.arange(width, device=device)[None, :, None]
    representative = prefix_representative(beams)
    real = beams != PAD
    is_unique = (representative == beam_ids) & real  # [B, W, L]
    flat_unique = is_unique.reshape(batch, width * length)
    slot_of_unique = flat_unique.long().cumsum(dim=1) - 1  # packed slot, valid where unique
    num_nodes = flat_unique.sum(dim=1)
    num_slots = int(num_nodes.max())

    # Slot of every beam token: the slot of its representative's token at the same depth.
    depth_ids = torch.arange(length, device=device)
    rep_flat = representative * length + depth_ids  # [B, W, L] index into the flat (w, j) grid
    node_index = slot_of_unique.gather(1, rep_flat.reshape(batch, -1)).reshape(batch, width, length)
    last_real = real.sum(dim=2, keepdim=True) - 1  # [B, W, 1]
    node_index = torch.where(real, node_index, node_index.gather(2, last_real))

    # Tokens and depths of packed slots; padding slots get a scratch slot past the end.
    target = torch.where(flat_unique, slot_of_unique, num_slots)  # [B, W*L]
    tokens = beams.new_empty(batch, num_slots + 1)
    tokens[:] = beams[:, :1, 0]
    tokens.scatter_(1, target, beams.reshape(batch, -1))
    depth = torch.zeros(batch, num_slots + 1, dtype=torch.long, device=device)
    depth.scatter_(1, target, depth_ids.repeat(width)[None].expand(batch, -1))

    # Ancestor mask: slot of (w, j) sees slots of (w, j') for j' <= j.
    rows = node_index[:, :, :, None].expand(-1, -1, -1, length)
    cols = node_index[:, :, None, :].expand(-1, -1, length, -1)
    sees = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    flat = (rows * num_slots + cols).reshape(batch, -1)
    counts = torch.zeros(batch, num_slots * num_slots, dtype=torch.int32, device=device)
    counts.scatter_add_(1, flat, sees.int().expand(batch, width, -1, -1).reshape(batch, -1))
    ancestors = counts.view(batch, num_slots, num_slots) > 0
    ancestors |= torch.eye(num_slots, dtype=torch.bool, device=device)
    return PackedTree(
        tokens=tokens[:, :num_slots],
        depth=depth[:, :num_slots],
        ancestors=ancestors,
        node_index=node_index,
        num_nodes=num_nodes,
    )


def tree_allowed(ancestors: torch.Tensor, context_valid: torch.Tensor) -> torch.Tensor:
    """``[B, N, C + N]`` bool: each tree slot sees the row's valid context and its own ancestors."""
    num_slots = ancestors.shape[1]
    return torch.cat([context_valid[:, None, :].expand(-1, num_slots, -1), ancestors], dim=2)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, q, K]`` bool -> ``[B, 1, q, K]``: 0 where allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def layer_masks(
    allowed: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor | None,
    windows: AttentionWindows,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` a decoder with sliding-window layers takes for ``allowed``.

    A sliding layer lets a query at position ``p`` see a key at position ``k`` only while
    ``p - k < window``, counted from the query's own position (a tree slot's position is its
    row's length plus its depth), as the model's own masks do.

    Args:
        allowed: ``[B, q, K]`` bool, what full attention may see.
        query_positions: ``[B, q]`` positions of the queries.
        key_positions: ``[B, K]`` positions of the keys (anything where not ``allowed``); only
            read with a window.
        windows: the target's layout (:func:`redrafter.models.attention_windows`).
        dtype: the target's compute dtype.
    Returns:
        the additive ``[B, 1, q, K]`` mask without a window; with one, the windowed mask (every
        layer slides) or ``{"full_attention": ..., "sliding_attention": ...}`` (per layer type).
    """
    if windows.window is None:
        return additive_mask(allowed, dtype)
    near = (query_positions[:, :, None] - key_positions[:, None, :]) < windows.window
    sliding = additive_mask(allowed & near, dtype)
    if not windows.per_layer_type:
        return sliding
    return {"full_attention": additive_mask(allowed, dtype), "sliding_attention": sliding}
