"""Beam search with the recurrent drafter: W candidate continuations of length L per row."""

from __future__ import annotations

import torch

from .drafter import RecurrentDrafter
from .tree import PAD


@torch.no_grad()
def beam_search(
    drafter: RecurrentDrafter,
    hidden: torch.Tensor,
    last_token: torch.Tensor,
    num_beams: int,
    draft_len: int,
    keep_pruned: bool = False,
) -> torch.Tensor:
    """Draft ``num_beams`` beams of ``draft_len`` tokens, token 0 being ``last_token``.

    Step 0 expands the single root; every later step keeps the ``W`` best of all ``W x K``
    extensions by cumulative log-probability and carries each survivor's parent RNN state.

    With ``keep_pruned``, the ``W`` partial beams held after every draft step but the last are
    returned too, :data:`~redrafter.tree.PAD`-tailed: a partial beam that no final beam extends
    would otherwise be lost. Their union is a prefix tree of exactly ``W`` nodes per depth (a
    survivor's prefix survived the step before), so the packed tree has at most
    ``1 + W (L - 1)`` slots either way; those that are prefixes of final beams add none.

    Args:
        drafter: the drafter (its embedding table attached).
        hidden: ``[B, d]`` target hidden state at the last accepted position.
        last_token: ``[B]`` the token the target produced there.
        num_beams: ``W``.
        draft_len: ``L`` (``L - 1`` drafted tokens per beam).
        keep_pruned: also return the partial beams of the earlier draft steps.
    Returns:
        ``[B, W, L]`` target token ids; ``[:, :, 0] == last_token``. With ``keep_pruned``,
        ``[B, W (L - 1), L]``: the final beams, then the ``W`` partial beams of ``1 .. L - 2``
        drafted tokens.
    """
    batch = hidden.shape[0]
    beams = last_token[:, None, None].expand(batch, num_beams, 1)
    if draft_len == 1:
        return beams.contiguous()
    state = drafter.rnn_step(torch.zeros_like(hidden), drafter.embed(last_token))  # [B, d]
    logprobs = drafter.head(hidden, state).float().log_softmax(dim=-1)  # [B, K]
    vocab = logprobs.shape[-1]
    width = min(num_beams, vocab)
    scores, draft_ids = logprobs.topk(width, dim=-1)  # [B, W]
    if width < num_beams:  # a tiny draft vocabulary: extra beams repeat the last, never win later
        pad = num_beams - width
        scores = torch.cat([scores, scores.new_full((batch, pad), -torch.inf)], dim=1)
        draft_ids = torch.cat([draft_ids, draft_ids[:, -1:].expand(-1, pad)], dim=1)
    tokens = [drafter.to_target_ids(draft_ids)]  # list of [B, W]
    partial = []  # [B, W, L] PAD-tailed partial beams of the earlier steps
    states = state[:, None, :].expand(-1, num_beams, -1)  # [B, W, d]
    hidden_w = hidden[:, None, :].expand(-1, num_beams, -1)
    for _ in range(draft_len - 2):
        if keep_pruned:
            drafted = torch.stack(tokens, dim=2)  # [B, W, j]
            tail = drafted.new_full((batch, num_beams, draft_len - 1 - drafted.shape[2]), PAD)
            partial.append(torch.cat([beams, drafted, tail], dim=2))
        states = drafter.rnn_step(states, drafter.embed(tokens[-1]))
        logprobs = drafter.head(hidden_w, states).float().log_softmax(dim=-1)  # [B, W, K]
        candidates = (scores[:, :, None] + logprobs).reshape(batch, -1)
        scores, flat = candidates.topk(num_beams, dim=-1)  # [B, W]
        parent, draft_ids = flat // vocab, flat % vocab
        tokens = [t.gather(1, parent) for t in tokens]
        tokens.append(drafter.to_target_ids(draft_ids))
        states = states.gather(1, parent[:, :, None].expand(-1, -1, states.shape[-1]))
    return torch.cat([torch.cat([beams, torch.stack(tokens, dim=2)], dim=2), *partial], dim=1)
