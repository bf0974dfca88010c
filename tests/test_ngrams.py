"""Corpus n-grams: hashing, the count table against a dictionary count, greedy back-off drafting,
persistence with a drafter, and the held-out walk."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import HIDDEN, VOCAB

from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.errors import RedrafterError
from redrafter.ngrams import FILE_NAME, NgramTable, _hashes, build_table, ngram_hash, walk_tokens_per_step


def reference_followers(sequences, min_n, max_n, min_count) -> dict[tuple[int, ...], int]:
    """Every n-gram seen at least ``min_count`` times with a follower -> its most frequent follower
    (ties: the smallest token id), by plain counting."""
    counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for sequence in sequences:
        for n in range(min_n, max_n + 1):
            for end in range(n, len(sequence)):
                counts[tuple(sequence[end - n : end])][sequence[end]] += 1
    return {
        gram: min(c, key=lambda token: (-c[token], token)) for gram, c in counts.items() if sum(c.values()) >= min_count
    }


def lookup(table: NgramTable, gram: tuple[int, ...]) -> int | None:
    key = np.uint64(ngram_hash(gram))
    at = int(np.searchsorted(table.keys, key))
    return int(table.followers[at]) if at < len(table) and table.keys[at] == key else None


@pytest.mark.parametrize("n", [1, 2, 5])
def test_vectorised_hashes_equal_the_python_hash(n):
    sequence = np.array([0, 7, 49151, 3, 3, 3, 12, 65535, 1], dtype=np.int64)
    expected = [ngram_hash(sequence[i : i + n].tolist()) for i in range(len(sequence) - n + 1)]
    assert _hashes(sequence, n).tolist() == expected
    assert ngram_hash([3, 3]) != ngram_hash([3, 3, 3]) != ngram_hash([3])  # the length is part of the key


@pytest.mark.parametrize("seed", range(20))
def test_table_equals_a_dictionary_count(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 12])
    sequences = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 40))] for _ in range(rng.randrange(1, 6))]
    min_n = rng.choice([1, 2])
    max_n = rng.choice([min_n, 3, 4])
    min_count = rng.choice([1, 2, 3])
    table = build_table(sequences, min_n, max_n, min_count)
    expected = reference_followers(sequences, min_n, max_n, min_count)
    assert len(table) == len(expected)
    assert np.all(np.diff(table.keys.astype(np.float64)) >= 0)
    for gram, follower in expected.items():
        assert lookup(table, gram) == follower, gram


def test_draft_chains_with_back_off_to_the_longest_known_suffix():
    # After "1 2" the corpus continues with 3 once and (after "0 1 2") with 4 twice; the longest
    # suffix decides, and drafting goes on from the drafted tokens themselves.
    table = build_table([[0, 1, 2, 4, 5], [0, 1, 2, 4, 5], [9, 1, 2, 3, 8]], min_n=1, max_n=3, min_count=1)
    assert table.draft([7, 0, 1, 2], 3) == [4, 5]  # nothing ever followed 5: drafting stops
    assert table.draft([9, 1, 2], 2) == [3, 8]
    assert table.draft([7, 1, 2], 2) == [4, 5]  # "7 1 2" unknown, "1 2" -> 4 (two against one)
    assert table.draft([6], 4) == []  # 6 never occurs
    assert table.draft([0, 1, 2], 0) == []


def test_min_count_drops_rare_ngrams():
    table = build_table([[1, 2, 3], [1, 2, 4], [5, 6]], min_n=1, max_n=2, min_count=2)
    assert lookup(table, (1,)) == 2 and lookup(table, (1, 2)) == 3  # seen twice (tie: smaller id)
    assert lookup(table, (5,)) is None and lookup(table, (2,)) == 3
    empty = build_table([], 1, 3)
    assert len(empty) == 0 and empty.draft([1, 2], 3) == []


@pytest.mark.parametrize("seed", range(10))
def test_shares_and_longest_suffix_against_a_dictionary_count(seed):
    rng = random.Random(seed)
    sequences = [[rng.randrange(4) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    table = build_table(sequences, 1, 3, 1)
    counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
    for sequence in sequences:
        for n in range(1, 4):
            for end in range(n, len(sequence)):
                counts[tuple(sequence[end - n : end])][sequence[end]] += 1
    for gram, followers in counts.items():
        at = int(np.searchsorted(table.keys, np.uint64(ngram_hash(gram))))
        follower = int(table.followers[at])
        assert table.shares[at] == 255 * followers[follower] // sum(followers.values()), gram
    history = [rng.randrange(5) for _ in range(6)]  # 4 never occurs: the suffix must back off past it
    expected = next(((n, gram) for n in (3, 2, 1) if (gram := tuple(history[-n:])) in counts), None)
    found = table.longest(history)
    if expected is None:
        assert found is None
    else:
        n, gram = expected
        assert found[0] == n and found[1] == lookup(table, gram) and found[1] == table.follower(history)


def test_saved_with_a_drafter_and_loaded_back(tmp_path):
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB))
    drafter.ngrams = build_table([[1, 2, 3, 1, 2, 4]], 1, 3, 1)
    drafter.ngrams.confidence = np.arange(112, dtype=np.float32).reshape(7, 16) / 112
    drafter.save_pretrained(tmp_path)
    loaded = RecurrentDrafter.from_pretrained(tmp_path)
    assert loaded.ngrams is not None
    assert np.array_equal(loaded.ngrams.keys, drafter.ngrams.keys)
    assert np.array_equal(loaded.ngrams.followers, drafter.ngrams.followers)
    assert np.array_equal(loaded.ngrams.shares, drafter.ngrams.shares)
    assert np.array_equal(loaded.ngrams.confidence, drafter.ngrams.confidence)
    assert (loaded.ngrams.min_n, loaded.ngrams.max_n) == (1, 3)
    assert loaded.ngrams.draft([7, 1, 2], 2) == drafter.ngrams.draft([7, 1, 2], 2)
    (tmp_path / FILE_NAME).unlink()
    assert RecurrentDrafter.from_pretrained(tmp_path).ngrams is None


def test_a_corrupt_table_is_a_clear_error(tmp_path):
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB))
    drafter.save_pretrained(tmp_path)
    (tmp_path / FILE_NAME).write_bytes(b"not a table")
    with pytest.raises(RedrafterError, match="not an n-gram table"):
        RecurrentDrafter.from_pretrained(tmp_path)


def test_walk_counts_accepted_drafts_plus_one_per_step():
    answer = list(range(10, 30))  # 20 distinct tokens
    table = build_table([answer], 1, 2, 1)
    # From the answer's first token the table knows the rest: steps emit 8, 8, then the last 3.
    assert walk_tokens_per_step(table, [([5], answer)], length=8) == pytest.approx(19 / 3)
    unknown = build_table([[1, 2, 3]], 1, 2, 1)
    assert walk_tokens_per_step(unknown, [([5], answer)], length=8) == 1.0
