"""Verification: the longest drafted prefix the target agrees with, plus the target's own next token.

"Agrees" means: equals the target's choice at the parent node, its argmax for greedy decoding or
an independent sample per node for exact sampling (:mod:`redrafter.sampling` explains why the
same rule is then distribution-exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    """What one verification step accepts, per row.

    Attributes:
        tokens: ``[B, L]`` emitted tokens: accepted drafts then the bonus token, then padding.
        num_tokens: ``[B]`` how many of ``tokens`` are emitted (accepted + 1, in ``1..L``).
        path: ``[B, L]`` packed slots of the accepted path (root first), padded with its last slot;
            ``path[b, num_tokens[b] - 1]`` is the slot whose hidden state feeds the next draft.
    """

    tokens: torch.Tensor
    num_tokens: torch.Tensor
    path: torch.Tensor


def verify(beams: torch.Tensor, node_index: torch.Tensor, target_choice: torch.Tensor) -> Verdict:
    """Accept, per row, the beam whose drafts match the target's choices the longest.

    Args:
        beams: ``[B, W, L]`` drafted beams (token 0 is the root, already decided).
        node_index: ``[B, W, L]`` packed slot of each beam token.
        target_choice: ``[B, N]`` the target's token after each packed slot (argmax or sample).
    Returns:
        The :class:`Verdict`. With argmax choices the emitted tokens equal greedy decoding's next
        ``num_tokens``.

    Beams on the CPU go to :func:`verify_on_host` (Python lists: for a decode step's few beams,
    cheaper than tensor operations), others to :func:`verify_on_device` (batched tensor arithmetic).
    """
    batch, width, length = beams.shape
    if width == 1 and length == 1:  # a plain step: the target's choice at the root
        ones = torch.ones(batch, dtype=torch.long, device=beams.device)
        return Verdict(tokens=target_choice[:, :1], num_tokens=ones, path=torch.zeros_like(target_choice[:, :1]))
    return (verify_on_host if beams.device.type == "cpu" else verify_on_device)(beams, node_index, target_choice)


def verify_on_device(beams: torch.Tensor, node_index: torch.Tensor, target_choice: torch.Tensor) -> Verdict:
    """:func:`verify` in batched tensor arithmetic, on the beams' device."""
    batch, width, length = beams.shape
    # The target's prediction after each beam token: [B, W, L].
    predicted = target_choice.gather(1, node_index.reshape(batch, -1)).reshape(batch, width, length)
    matches = beams[:, :, 1:] == predicted[:, :, :-1]  # [B, W, L-1]
    accepted = matches.long().cumprod(dim=-1).sum(dim=-1)  # [B, W]
    best_len, best = accepted.max(dim=1)  # first beam among the longest
    rows = torch.arange(batch, device=beams.device)
    best_beam, best_pred, best_nodes = beams[rows, best], predicted[rows, best], node_index[rows, best]
    steps = torch.arange(length, device=beams.device)[None, :]
    last = best_len[:, None]
    # Emitted: drafts 1..a, then the bonus (the target's prediction after draft a).
    drafts = best_beam.roll(-1, dims=1)
    bonus = best_pred.gather(1, last)
    tokens = torch.where(steps < last, drafts, bonus)
    path = best_nodes.gather(1, torch.minimum(steps, last))
    return Verdict(tokens=tokens, num_tokens=best_len + 1, path=path)


def verify_on_host(beams: torch.Tensor, node_index: torch.Tensor, target_choice: torch.Tensor) -> Verdict:
    """:func:`verify` over the beams as Python lists, for beams on the CPU: the same :class:`Verdict`."""
    length = beams.shape[2]
    tokens, num_tokens, path = [], [], []
    for row, slots, choice in zip(beams.tolist(), node_index.tolist(), target_choice.tolist(), strict=True):
        best, best_len = 0, -1
        for w, (beam, beam_slots) in enumerate(zip(row, slots, strict=True)):
            accepted = 0
            while accepted < length - 1 and beam[accepted + 1] == choice[beam_slots[accepted]]:
                accepted += 1
            if accepted > best_len:  # the first beam among the longest
                best, best_len = w, accepted
        beam, beam_slots = row[best], slots[best]
        bonus = choice[beam_slots[best_len]]
        tokens.append(beam[1 : best_len + 1] + [bonus] * (length - best_len))
        num_tokens.append(best_len + 1)
        path.append(beam_slots[: best_len + 1] + [beam_slots[best_len]] * (length - best_len - 1))
    return Verdict(
        tokens=torch.tensor(tokens, dtype=beams.dtype),
        num_tokens=torch.tensor(num_tokens),
        path=torch.tensor(path),
    )
