"""Context lookup: one extra beam per row, copied from the row's own prompt and output.

Small models repeat themselves and their prompts (lists, code, names, quoted text). Next to the
drafter's ``W`` beams, the tree gets one more: the tokens that followed the most recent earlier
occurrence of the row's last ``n`` tokens (longest ``n`` first), as in prompt lookup decoding. It
goes through the same tree, verification and cache as the drafter's beams, so output is unchanged;
when nothing matches, the beam repeats the drafter's first beam and de-duplication removes it.
The lookup beam may be longer than the drafter's (a copied span is often long, and costs no
drafting); the drafter's beams then end in :data:`redrafter.tree.PAD`.

The copy may overlap its own end (``a b a b`` continues ``a b ...``), like an LZ77 back-reference,
so a loop of period ``q < L`` is continued for the whole beam.

Host-side state: per row, the token history and, per ``n``, a dict from each ``n``-gram to the
position right after its latest occurrence that has a follower. Each step costs ``O(emitted x n)``.
"""

from __future__ import annotations

import torch

from .tree import PAD


class ContextLookup:
    """N-gram lookup over each row's prompt and emitted tokens.

    Args:
        prompts: the rows' prompt token ids (the history starts with them).
        length: tokens in the lookup beam, its root (the row's last token) included.
        max_length: the longest a lookup beam grows to (default ``4 * length``).
        max_positions: the target's context; a beam never reaches past it.
        max_ngram: longest suffix tried first.
        min_ngram: shortest suffix tried.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        length: int,
        max_length: int | None = None,
        max_positions: int | None = None,
        max_ngram: int = 3,
        min_ngram: int = 1,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.length, self.max_length = length, max(length, max_length or 4 * length)
        self.max_positions = max_positions
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.histories: list[list[int]] = [[] for _ in prompts]
        self.indexes: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
        self.lengths = [length] * len(prompts)  # each row's current lookup beam length
        self.proposed: list[list[int] | None] = [None] * len(prompts)  # each row's last lookup drafts
        for row, prompt in enumerate(prompts):
            self.extend(row, prompt)

    def extend(self, row: int, tokens: list[int]) -> None:
        """Append ``tokens`` (what ``row`` emitted) to its history and index the n-grams they
        complete; grow or reset the row's lookup length by whether its last lookup beam was accepted."""
        proposed = self.proposed[row]
        if proposed is not None:
            whole = tokens[: len(proposed)] == proposed and len(tokens) > len(proposed)
            self.lengths[row] = min(2 * self.lengths[row], self.max_length) if whole else self.length
            self.proposed[row] = None
        history, index = self.histories[row], self.indexes[row]
        for token in tokens:
            position = len(history)  # the new token's position: it follows the n-grams ending before it
            for n in self.sizes:
                if position >= n:
                    index[tuple(history[position - n : position])] = position
            history.append(token)

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        self.histories = [self.histories[i] for i in rows]
        self.indexes = [self.indexes[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]
        self.proposed = [self.proposed[i] for i in rows]

    def continuation(self, row: int, count: int) -> list[int] | None:
        """The ``count`` tokens predicted by the longest matching suffix, or None without a match."""
        history, index = self.histories[row], self.indexes[row]
        for n in self.sizes:
            if len(history) < n:
                continue
            start = index.get(tuple(history[-n:]))
            if start is not None:
                copied = history[start : start + count]
                while len(copied) < count:  # the copy runs into its own output: keep copying
                    copied.append(copied[len(copied) - (len(history) - start)])
                return copied
        return None

    def beams(self, drafted: torch.Tensor) -> torch.Tensor:
        """Add each row's lookup beam to ``drafted`` beams.

        Args:
            drafted: ``[B, W, L]`` beams (token 0 of each row is the last token of its history).
        Returns:
            ``[B, W + 1, M]`` with ``M`` the longest of ``L`` and the rows' lookup lengths, shorter
            beams ending in ``PAD``: the lookup beam last, a copy of beam 0 for rows without a match.
        """
        batch, width, draft_len = drafted.shape
        found = {}
        for row in range(batch):
            count = self.lengths[row] - 1
            if self.max_positions is not None:  # the deepest node sits at position len(history) - 1 + count
                count = min(count, self.max_positions - len(self.histories[row]))
            copied = self.continuation(row, count)
            if copied:
                self.proposed[row] = copied
                found[row] = [self.histories[row][-1], *copied]
        length = max([draft_len] + [len(beam) for beam in found.values()])
        beams = drafted.new_full((batch, width + 1, length), PAD)
        beams[:, :width, :draft_len] = drafted
        beams[:, width, :draft_len] = drafted[:, 0]
        if found:
            index = torch.tensor(list(found), device=beams.device)
            values = [beam + [PAD] * (length - len(beam)) for beam in found.values()]
            beams[index, width] = torch.tensor(values, dtype=beams.dtype).to(beams.device)
        return beams
