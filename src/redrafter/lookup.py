"""Lookup beams: extra beams per row, copied from the row's own prompt and output, and drafted
from the corpus n-gram table.

Small models repeat themselves and their prompts (lists, code, names, quoted text). Next to the
drafter's ``W`` beams, the tree gets one more: the tokens that followed the most recent earlier
occurrence of the row's last ``n`` tokens (longest ``n`` first), as in prompt lookup decoding. It
goes through the same tree, verification and cache as the drafter's beams, so output is unchanged;
when nothing matches, the beam repeats the drafter's first beam and de-duplication removes it.
The lookup beam may be longer than the drafter's (a copied span is often long, and costs no
drafting); the drafter's beams then end in :data:`redrafter.tree.PAD`.

The copy may overlap its own end (``a b a b`` continues ``a b ...``), like an LZ77 back-reference,
so a loop of period ``q < L`` is continued for the whole beam.

With an :class:`~redrafter.ngrams.NgramTable` (the corpus's n-grams, shipped with a drafter), a
second extra beam per row is drafted from it (:meth:`NgramTable.draft`), with no match likewise a
copy of the drafter's first beam.

Host-side state: per row, the token history and, per ``n``, a dict from each ``n``-gram to the
position right after its latest occurrence that has a follower. Each step costs ``O(emitted x n)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .ngrams import NgramTable
from .tree import PAD


def index_tokens(
    history: list[int], index: dict[tuple[int, ...], int], tokens: Sequence[int], sizes: Iterable[int]
) -> None:
    """Append ``tokens`` to ``history``; ``index`` maps each ``n``-gram they complete (``n`` in ``sizes``)
    to the position right after it, its latest follower."""
    for token in tokens:
        position = len(history)  # the new token's position: it follows the n-grams ending before it
        for n in sizes:
            if position >= n:
                index[tuple(history[position - n : position])] = position
        history.append(token)


def with_extra_beams(drafted: torch.Tensor, extra: int, found: dict[tuple[int, int], list[int]]) -> torch.Tensor:
    """``drafted`` ``[B, W, L]`` and ``extra`` more beams per row: ``found[row, column]`` (a column from
    ``W``, root included) where given, else a copy of the row's beam 0. Returns ``[B, W + extra, M]``,
    ``M`` the longest of ``L`` and the found beams, shorter beams ending in ``PAD``."""
    batch, width, draft_len = drafted.shape
    length = max([draft_len] + [len(tokens) for tokens in found.values()])
    beams = drafted.new_full((batch, width + extra, length), PAD)
    beams[:, :width, :draft_len] = drafted
    beams[:, width:, :draft_len] = drafted[:, :1]
    if found:
        rows, columns = (torch.tensor(index, device=beams.device) for index in zip(*found, strict=True))
        values = [tokens + [PAD] * (length - len(tokens)) for tokens in found.values()]
        beams[rows, columns] = torch.tensor(values, dtype=beams.dtype).to(beams.device)
    return beams


class LookupBeams:
    """The extra beams of each row: a context-lookup beam (n-gram matches in the row's own prompt and
    emitted tokens) and optionally an n-gram beam drafted from a corpus table.

    Args:
        prompts: the rows' prompt token ids (the history starts with them).
        length: tokens in the lookup beam, its root (the row's last token) included; below 2, no
            context-lookup beam.
        max_length: the longest a lookup beam grows to (default ``4 * length``).
        max_positions: the target's context; a beam never reaches past it.
        max_ngram: longest suffix tried first.
        min_ngram: shortest suffix tried.
        ngrams: a corpus n-gram table drafting one more beam per row, or None.
        ngram_length: tokens in the n-gram beam, its root included (below 2: no n-gram beam).
    """

    def __init__(
        self,
        prompts: list[list[int]],
        length: int,
        max_length: int | None = None,
        max_positions: int | None = None,
        max_ngram: int = 3,
        min_ngram: int = 1,
        ngrams: NgramTable | None = None,
        ngram_length: int = 0,
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.length, self.max_length = length, max(length, max_length or 4 * length)
        self.max_positions = max_positions
        use_ngrams = ngrams is not None and ngram_length > 1
        self.ngrams, self.ngram_length = (ngrams, ngram_length) if use_ngrams else (None, 0)
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
        index_tokens(self.histories[row], self.indexes[row], tokens, self.sizes)

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        self.histories = [self.histories[i] for i in rows]
        self.indexes = [self.indexes[i] for i in rows]
        self.lengths = [self.lengths[i] for i in rows]
        self.proposed = [self.proposed[i] for i in rows]

    def merge(self, other: LookupBeams) -> None:
        """Append ``other``'s rows (same settings) after these."""
        self.histories += other.histories
        self.indexes += other.indexes
        self.lengths += other.lengths
        self.proposed += other.proposed

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

    @property
    def extra_beams(self) -> int:
        """Beams added per row: the context-lookup beam and/or the n-gram beam."""
        return int(self.length > 1) + int(self.ngrams is not None)

    def columns(self, width: int) -> tuple[int | None, int | None]:
        """Where :meth:`beams` puts its extra beams after ``width`` drafted ones: the context-lookup
        beam's column and the n-gram beam's (None for one it does not add)."""
        lookup = width if self.length > 1 else None
        ngram = width + int(self.length > 1) if self.ngrams is not None else None
        return lookup, ngram

    def _room(self, row: int, count: int) -> int:
        """``count`` capped so the deepest node (at position ``len(history) - 1 + count``) fits the context."""
        return count if self.max_positions is None else min(count, self.max_positions - len(self.histories[row]))

    def beams(self, drafted: torch.Tensor, lookup_len: int | None = None, ngram_len: int | None = None) -> torch.Tensor:
        """Add each row's lookup beams to ``drafted`` beams.

        Args:
            drafted: ``[B, W, L]`` beams (token 0 of each row is the last token of its history).
            lookup_len: cut the context-lookup beam to this many tokens, its root included (a
                smaller tree's; None: the row's own length).
            ngram_len: cut the n-gram beam likewise (None: ``ngram_length``).
        Returns:
            ``[B, W + E, M]`` (``E`` = :attr:`extra_beams`) with ``M`` the longest of ``L`` and the
            rows' lookup lengths, shorter beams ending in ``PAD``: the context-lookup beam, then the
            n-gram beam; a copy of beam 0 for a row without a match (or a beam cut below 2 tokens).
        """
        batch, width, _ = drafted.shape
        ngram_len = self.ngram_length if ngram_len is None else min(ngram_len, self.ngram_length)
        lookup_column, ngram_column = self.columns(width)
        found: dict[tuple[int, int], list[int]] = {}  # (row, beam) -> tokens
        for row in range(batch):
            history = self.histories[row]
            if lookup_column is not None:
                length = self.lengths[row] if lookup_len is None else min(lookup_len, self.lengths[row])
                copied = self.continuation(row, self._room(row, length - 1)) if length > 1 else None
                if copied:
                    if length == self.lengths[row]:  # a cut beam neither grows nor resets the length
                        self.proposed[row] = copied
                    found[row, lookup_column] = [history[-1], *copied]
            if ngram_column is not None and ngram_len > 1:
                drafted_ngrams = self.ngrams.draft(history, self._room(row, ngram_len - 1))
                if drafted_ngrams:
                    found[row, ngram_column] = [history[-1], *drafted_ngrams]
        return with_extra_beams(drafted, self.extra_beams, found)
