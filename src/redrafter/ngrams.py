"""Corpus n-grams: a count table of what the target writes, drafted from greedily.

A small target says the same things in many answers ("Here are some tips to ...", list
scaffolding, closing lines). The self-distilled corpus that trains the recurrent drafter also
records them: for every ``n``-gram (``min_n <= n <= max_n``) of its answers, the token that most
often follows it. At decode time the table drafts one more beam per row by greedy chaining with
back-off: the next token is the one that follows the longest suffix of (history + drafted so far)
found in the table; drafting stops where no suffix is found. The beam goes through the same tree
and verification as every other beam, so output is unchanged; it pays off where the drafter's
one-hidden-state view and the row's own context miss a stock phrase (retrieval drafting, as in
REST, with the target's own words as the datastore).

Storage: ``n``-grams are hashed to 64 bits (:func:`ngram_hash`, the same in Python and vectorised
numpy); the table is the sorted hashes ``[E]``, the followers ``[E]`` and each follower's share of
its ``n``-gram's continuations ``[E]`` (a byte), looked up with a binary search. ``n``-grams seen
fewer than ``min_count`` times are dropped (rare ones are mostly noise and make most of the table).
Saved as ``ngrams.safetensors`` next to a drafter, with the confidence grid of
:mod:`redrafter.confidence` when one was fitted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import RedrafterError
from .files import atomic_write

FILE_NAME = "ngrams.safetensors"
_MASK = (1 << 64) - 1
_PRIME = 0x100000001B3  # the FNV-1a 64-bit prime
_SEED = 0xCBF29CE484222325  # the FNV-1a 64-bit offset basis


def ngram_hash(tokens: Sequence[int]) -> int:
    """The table's 64-bit key of ``tokens`` (its length is part of the key)."""
    key = (_SEED ^ len(tokens)) * _PRIME & _MASK
    for token in tokens:
        key = (key ^ (token + 1)) * _PRIME & _MASK
    return key


def _hashes(sequence: np.ndarray, n: int) -> np.ndarray:
    """Keys of every ``n``-gram of ``sequence [T]`` (int64), vectorised: ``[T - n + 1]`` uint64."""
    count = len(sequence) - n + 1
    with np.errstate(over="ignore"):
        keys = np.full(count, (_SEED ^ n) * _PRIME & _MASK, dtype=np.uint64)
        for k in range(n):
            keys = (keys ^ (sequence[k : k + count].astype(np.uint64) + np.uint64(1))) * np.uint64(_PRIME)
    return keys


@dataclass
class NgramTable:
    """Sorted ``keys [E]`` (uint64 n-gram hashes) and the most frequent ``followers [E]``.

    Attributes:
        keys: sorted 64-bit hashes of the kept n-grams.
        followers: the token that most often followed each one.
        min_n: shortest n-gram kept (the last resort of the back-off).
        max_n: longest n-gram kept (tried first).
        shares: ``[E]`` uint8, ``floor(255 * count(follower) / count(n-gram))`` (None in a table
            saved before it was kept).
        confidence: the confidence tree's grid (:func:`redrafter.confidence.fit_confidence`), ``[C, G]``
            float32, or None.
    """

    keys: np.ndarray
    followers: np.ndarray
    min_n: int
    max_n: int
    shares: np.ndarray | None = None
    confidence: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def follower(self, history: Sequence[int]) -> int | None:
        """The token after the longest known suffix of ``history``, or None when none is known."""
        found = self.longest(history)
        return None if found is None else found[1]

    def longest(self, history: Sequence[int]) -> tuple[int, int, int] | None:
        """``(n, follower, share)`` of the longest known suffix of ``history``, or None."""
        suffix = list(history[-self.max_n :])
        sizes = range(min(self.max_n, len(suffix)), self.min_n - 1, -1)
        if not len(sizes) or not len(self.keys):
            return None
        wanted = [ngram_hash(suffix[len(suffix) - n :]) for n in sizes]
        found = self.keys.searchsorted(np.array(wanted, dtype=np.uint64)).tolist()
        for n, key, at in zip(sizes, wanted, found, strict=True):
            if at < len(self.keys) and int(self.keys[at]) == key:
                share = 255 if self.shares is None else int(self.shares[at])
                return n, int(self.followers[at]), share
        return None

    def draft(self, history: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` tokens after ``history``, each the follower of the longest known suffix."""
        tail, drafted = list(history[-self.max_n :]), []
        while len(drafted) < count:
            token = self.follower(tail)
            if token is None:
                break
            drafted.append(token)
            tail = (tail + [token])[-self.max_n :]
        return drafted

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``folder/ngrams.safetensors`` atomically."""
        tensors = {
            "keys": torch.from_numpy(self.keys.view(np.int64).copy()),
            "followers": torch.from_numpy(self.followers.astype(np.int32)),
        }
        if self.shares is not None:
            tensors["shares"] = torch.from_numpy(self.shares.astype(np.uint8))
        if self.confidence is not None:
            tensors["confidence"] = torch.from_numpy(self.confidence.astype(np.float32))
        metadata = {"min_n": str(self.min_n), "max_n": str(self.max_n)}
        atomic_write(Path(folder) / FILE_NAME, lambda p: save_file(tensors, p, metadata=metadata))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NgramTable | None:
        """The table saved in ``folder``, or None when it has none."""
        path = Path(folder) / FILE_NAME
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
            keys = tensors["keys"].numpy().view(np.uint64)
            followers = tensors["followers"].numpy()
            shares = tensors["shares"].numpy() if "shares" in tensors else None
            confidence = tensors["confidence"].numpy() if "confidence" in tensors else None
            min_n, max_n = int(metadata["min_n"]), int(metadata["max_n"])
        except (KeyError, ValueError, OSError, SafetensorError) as error:
            raise RedrafterError(f"{path}: not an n-gram table ({error})") from None
        if (
            keys.shape != followers.shape
            or (shares is not None and shares.shape != keys.shape)
            or not 1 <= min_n <= max_n
        ):
            raise RedrafterError(f"{path}: inconsistent n-gram table")
        return cls(keys, followers, min_n, max_n, shares, confidence)


def build_table(sequences: Sequence[Sequence[int]], min_n: int = 2, max_n: int = 6, min_count: int = 2) -> NgramTable:
    """Count every ``n``-gram of ``sequences`` and its followers (n-grams never cross sequences).

    Args:
        sequences: token id lists (the corpus's answers).
        min_n, max_n: the n-gram lengths kept. The default ``min_n = 2`` stops drafting where only
            the last token is known: a unigram's follower is rarely right and costs a tree node.
        min_count: an n-gram seen fewer times than this is dropped.
    Returns:
        the table: per kept n-gram its most frequent follower (ties: the smallest token id) and that
        follower's share of the n-gram's continuations.
    """
    if not 1 <= min_n <= max_n:
        raise RedrafterError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
    all_keys, all_next = [], []
    for sequence in sequences:
        array = np.asarray(sequence, dtype=np.int64)
        for n in range(min_n, min(max_n, len(array) - 1) + 1):
            all_keys.append(_hashes(array[:-1], n))  # the n-grams that have a follower
            all_next.append(array[n:])
    if not all_keys:
        return NgramTable(np.zeros(0, np.uint64), np.zeros(0, np.int32), min_n, max_n, np.zeros(0, np.uint8))
    keys, followers = np.concatenate(all_keys), np.concatenate(all_next)
    # Count each (n-gram, follower) pair, then keep per n-gram the most frequent follower.
    order = np.lexsort((followers, keys))
    keys, followers = keys[order], followers[order]
    pair_start = np.ones(len(keys), dtype=bool)
    pair_start[1:] = (keys[1:] != keys[:-1]) | (followers[1:] != followers[:-1])
    starts = np.nonzero(pair_start)[0]
    pair_counts = np.diff(np.append(starts, len(keys)))
    pair_keys, pair_next = keys[starts], followers[starts]
    # Within one n-gram, sort its pairs by count (descending), then follower id (ascending).
    order = np.lexsort((pair_next, -pair_counts, pair_keys))
    pair_keys, pair_next, pair_counts = pair_keys[order], pair_next[order], pair_counts[order]
    first = np.ones(len(pair_keys), dtype=bool)
    first[1:] = pair_keys[1:] != pair_keys[:-1]
    group_start = np.nonzero(first)[0]
    totals = np.add.reduceat(pair_counts, group_start)
    kept = totals >= min_count
    keep = group_start[kept]
    shares = (255 * pair_counts[keep] // totals[kept]).astype(np.uint8)
    return NgramTable(pair_keys[keep], pair_next[keep].astype(np.int32), min_n, max_n, shares)


def walk_tokens_per_step(table: NgramTable, pairs: Sequence[tuple[list[int], list[int]]], length: int) -> float:
    """Tokens per step if the n-gram beam of ``length`` tokens (root included) were the only draft.

    Walks each answer of ``pairs`` (prompt ids, answer ids) as greedy decoding would: from each
    position, the drafted tokens that match the answer are accepted, plus the target's own token.
    """
    tokens = steps = 0
    for prompt, answer in pairs:
        sequence, position = list(prompt) + list(answer), len(prompt) + 1
        while position < len(sequence):
            drafted, truth = table.draft(sequence[:position], length - 1), sequence[position:]
            accepted = 0
            while accepted < min(len(drafted), len(truth)) and drafted[accepted] == truth[accepted]:
                accepted += 1
            advance = min(accepted + 1, len(truth))
            tokens, steps, position = tokens + advance, steps + 1, position + advance
    return tokens / max(1, steps)
