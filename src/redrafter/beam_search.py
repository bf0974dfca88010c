"""Beam search with the recurrent drafter: W candidate continuations of length L per row, or the
``K`` most probable drafted prefixes of any length (a dynamic tree)."""

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
    tree_nodes: int = 0,
) -> torch.Tensor:
    """Draft ``num_beams`` beams of ``draft_len`` tokens, token 0 being ``last_token``.

    Step 0 expands the single root; every later step keeps the ``W`` best of all ``W x K``
    extensions by cumulative log-probability and carries each survivor's parent RNN state.

    With ``tree_nodes`` ``T > 0``, the result is instead the ``T`` most probable of the ``W (L - 1)``
    prefixes that beam search held after any step (``W`` per depth), each :data:`PAD`-tailed, most
    probable first: a dynamic tree (as in EAGLE-2) that spends its nodes where the drafter is
    confident, shallow where it hesitates and deep where it is sure, and keeps a partial beam that
    no final beam extends. A prefix is never less probable than its own extensions, and a
    survivor's parent survived the step before, so the ``T`` prefixes are closed under taking
    prefixes (ties apart): the packed tree has ``1 + T`` nodes. ``T >= W (L - 1)`` keeps them all.

    Args:
        drafter: the drafter (its embedding table attached).
        hidden: ``[B, (1 + n) d]`` target features at the last accepted position (the final
            hidden state, then the drafter's fused layers' outputs: :meth:`RecurrentDrafter.condition`).
        last_token: ``[B]`` the token the target produced there.
        num_beams: ``W``.
        draft_len: ``L`` (``L - 1`` drafted tokens per beam).
        tree_nodes: ``T``, drafted prefixes kept (0: the ``W`` final beams).
    Returns:
        ``[B, W, L]`` target token ids with ``[:, :, 0] == last_token``; with ``tree_nodes``,
        ``[B, min(T, W (L - 1)), L]``.
    """
    batch = hidden.shape[0]
    beams = last_token[:, None, None].expand(batch, num_beams, 1)
    if draft_len == 1:
        return beams.contiguous()
    hidden = drafter.condition(hidden)  # [B, d]
    state = drafter.rnn_step(None, drafter.embed(last_token))  # [B, d]
    logprobs = drafter.head(hidden, state).float().log_softmax(dim=-1)  # [B, K]
    vocab = logprobs.shape[-1]
    width = min(num_beams, vocab)
    scores, draft_ids = logprobs.topk(width, dim=-1)  # [B, W]
    if width < num_beams:  # a tiny draft vocabulary: extra beams repeat the last, never win later
        pad = num_beams - width
        scores = torch.cat([scores, scores.new_full((batch, pad), -torch.inf)], dim=1)
        draft_ids = torch.cat([draft_ids, draft_ids[:, -1:].expand(-1, pad)], dim=1)
    tokens = [drafter.to_target_ids(draft_ids)]  # list of [B, W]
    held, held_scores = [], []  # the W prefixes after each step: [B, W, L] PAD-tailed, [B, W]
    states = state[:, None, :].expand(-1, num_beams, -1)  # [B, W, d]
    hidden_w = hidden[:, None, :].expand(-1, num_beams, -1)
    for _ in range(draft_len - 2):
        if tree_nodes:
            drafted = torch.stack(tokens, dim=2)  # [B, W, j]
            tail = drafted.new_full((batch, num_beams, draft_len - 1 - drafted.shape[2]), PAD)
            held.append(torch.cat([beams, drafted, tail], dim=2))
            held_scores.append(scores)
        states = drafter.rnn_step(states, drafter.embed(tokens[-1]))
        logprobs = drafter.head(hidden_w, states).float().log_softmax(dim=-1)  # [B, W, K]
        candidates = (scores[:, :, None] + logprobs).reshape(batch, -1)
        scores, flat = candidates.topk(num_beams, dim=-1)  # [B, W]
        parent, draft_ids = flat // vocab, flat % vocab
        tokens = [t.gather(1, parent) for t in tokens]
        tokens.append(drafter.to_target_ids(draft_ids))
        states = states.gather(1, parent[:, :, None].expand(-1, -1, states.shape[-1]))
    final = torch.cat([beams, torch.stack(tokens, dim=2)], dim=2)  # [B, W, L]
    if not tree_nodes:
        return final
    pool = torch.cat([final, *held], dim=1)  # [B, W (L - 1), L]
    best = torch.cat([scores, *held_scores], dim=1).topk(min(tree_nodes, pool.shape[1]), dim=1).indices
    return pool.gather(1, best[:, :, None].expand(-1, -1, draft_len))
