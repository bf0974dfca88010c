"""Context lookup: continuations against a brute-force search; the extra beam and its padding."""

from __future__ import annotations

import random

import pytest
import torch

from redrafter.lookup import LookupBeams
from redrafter.ngrams import build_table
from redrafter.tree import PAD


def reference_continuation(history: list[int], count: int, sizes: range) -> list[int] | None:
    """Longest suffix first; its latest earlier occurrence with a follower; copy, overlapping."""
    for n in sizes:
        if len(history) < n:
            continue
        suffix = history[-n:]
        starts = [i + n for i in range(len(history) - n) if history[i : i + n] == suffix]
        if starts:
            extended = list(history)
            start = max(starts)
            for i in range(count):
                extended.append(extended[start + i])
            return extended[len(history) :]
    return None


@pytest.mark.parametrize("seed", range(100))
def test_continuation_matches_brute_force(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 20])
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
    lookup = LookupBeams([prompt], length=6, max_ngram=3, min_ngram=rng.choice([1, 2]))
    history = list(prompt)
    for _ in range(5):  # the history grows by steps of several tokens, as in the decode loop
        emitted = [rng.randrange(vocab) for _ in range(rng.randrange(1, 5))]
        lookup.extend(0, emitted)
        history += emitted
        assert lookup.histories[0] == history
        assert lookup.continuation(0, 5) == reference_continuation(history, 5, lookup.sizes)


def test_latest_occurrence_and_longest_suffix_win():
    # "7 8" occurs twice; the suffix "1 7 8" only once, at the start: the trigram decides.
    lookup = LookupBeams([[1, 7, 8, 2, 3, 7, 8, 4, 5, 1, 7, 8]], length=3)
    assert lookup.continuation(0, 2) == [2, 3]
    lookup = LookupBeams([[7, 8, 2, 3, 7, 8, 4, 5, 9, 7, 8]], length=3)
    assert lookup.continuation(0, 2) == [4, 5]  # the latest "7 8"


def test_a_loop_is_continued_past_the_end_of_history():
    lookup = LookupBeams([[4, 1, 2, 1, 2]], length=6)
    assert lookup.continuation(0, 5) == [1, 2, 1, 2, 1]


def test_no_match_and_row_selection():
    lookup = LookupBeams([[1, 2, 3], [5, 6, 5]], length=4)
    assert lookup.continuation(0, 3) is None
    assert lookup.continuation(1, 3) == [6, 5, 6]
    lookup.select([1])
    assert lookup.histories == [[5, 6, 5]]
    assert lookup.continuation(0, 3) == [6, 5, 6]


def test_beams_add_one_padded_lookup_beam():
    # Row 0 repeats itself, row 1 has no earlier occurrence of its last token.
    lookup = LookupBeams([[3, 4, 5, 6, 3], [7, 8, 9]], length=5)
    drafted = torch.tensor([[[3, 1, 2], [3, 1, 0]], [[9, 2, 2], [9, 0, 1]]])  # [B=2, W=2, L=3]
    beams = lookup.beams(drafted)
    assert beams.shape == (2, 3, 5)
    assert torch.equal(beams[:, :2, :3], drafted)
    assert (beams[:, :2, 3:] == PAD).all()
    assert beams[0, 2].tolist() == [3, 4, 5, 6, 3]
    assert beams[1, 2].tolist() == [9, 2, 2, PAD, PAD]  # no match: a copy of beam 0, removed by de-duplication


def test_a_lookup_beam_shorter_than_the_drafts_is_padded():
    lookup = LookupBeams([[1, 2, 1]], length=2)
    beams = lookup.beams(torch.tensor([[[1, 5, 5, 5]]]))
    assert beams[0, 1].tolist() == [1, 2, PAD, PAD]


def test_a_wholly_accepted_lookup_beam_doubles_up_to_the_maximum_and_a_miss_resets_it():
    lookup = LookupBeams([[1, 2, 3, 4, 5, 6, 7, 8, 9, 1]], length=3, max_length=8)
    drafted = torch.tensor([[[1, 0, 0]]])
    assert lookup.beams(drafted)[0, 1].tolist() == [1, 2, 3]
    lookup.extend(0, [2, 3, 4])  # both drafts accepted, then the bonus: the next beam is 6 long
    assert lookup.beams(torch.tensor([[[4, 0, 0]]]))[0, 1].tolist() == [4, 5, 6, 7, 8, 9]
    lookup.extend(0, [5, 6, 7, 8, 9, 1])
    assert lookup.lengths == [8]  # 12, capped
    assert lookup.beams(torch.tensor([[[1, 0, 0]]]))[0, 1].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    lookup.extend(0, [2, 3, 0])  # rejected after two drafts
    assert lookup.lengths == [3]


def test_a_lookup_beam_never_reaches_past_the_context():
    lookup = LookupBeams([[1, 2, 3, 4, 5, 6, 1]], length=6, max_positions=9)
    beams = lookup.beams(torch.tensor([[[1, 0]]]))
    # The root sits at position 6: two more tokens reach position 8, the last one there is.
    assert beams[0, 1].tolist() == [1, 2, 3]


def test_an_ngram_beam_follows_the_context_beam():
    table = build_table([[9, 4, 4, 1], [6, 6, 6, 6]], min_n=1, max_n=2, min_count=1)
    # Row 0: the context repeats "3 4 5"; the table continues "9" with "4 4 1". Row 1: neither knows 8.
    lookup = LookupBeams([[3, 4, 5, 3], [7, 8]], length=4, ngrams=table, ngram_length=4)
    assert lookup.extra_beams == 2
    drafted = torch.tensor([[[3, 1]], [[8, 2]]])  # [B=2, W=1, L=2]
    beams = lookup.beams(drafted)
    assert beams.shape == (2, 3, 4)
    assert beams[0].tolist() == [[3, 1, PAD, PAD], [3, 4, 5, 3], [3, 1, PAD, PAD]]  # "3" unknown to the table
    assert beams[1].tolist() == [[8, 2, PAD, PAD]] * 3  # no match anywhere: copies of beam 0
    lookup.extend(0, [9])
    assert lookup.beams(torch.tensor([[[9, 1]], [[8, 2]]]))[0, 2].tolist() == [9, 4, 4, 1]


def test_an_ngram_beam_alone_and_capped_by_the_context():
    table = build_table([[1, 2, 3, 4, 5, 6]], min_n=1, max_n=1, min_count=1)
    lookup = LookupBeams([[0, 0, 1]], length=0, ngrams=table, ngram_length=8, max_positions=6)
    assert lookup.extra_beams == 1
    beams = lookup.beams(torch.tensor([[[1, 7]]]))
    # No context beam; the root sits at position 2, so three drafts reach the last position, 5.
    assert beams.tolist() == [[[1, 7, PAD, PAD], [1, 2, 3, 4]]]
    assert LookupBeams([[1]], length=3, ngrams=table, ngram_length=1).extra_beams == 1  # too short: off


def test_a_small_tree_cuts_both_beams_and_a_cut_beam_leaves_the_length_alone():
    table = build_table([[9, 4, 7, 1]], min_n=1, max_n=1, min_count=1)
    lookup = LookupBeams([[1, 2, 3, 4, 5, 6, 1]], length=3, max_length=8, ngrams=table, ngram_length=4)
    lookup.extend(0, [2, 3, 4])  # no lookup beam proposed yet: nothing judged
    lookup.lengths = [6]  # as after a wholly accepted beam
    drafted = torch.tensor([[[4, 0]]])
    cut = lookup.beams(drafted, lookup_len=2, ngram_len=2)
    assert cut.tolist() == [[[4, 0], [4, 5], [4, 7]]]  # "4" -> "5" from the context, "4" -> "7" from the table
    lookup.extend(0, [5, 6])  # the cut beam was wholly accepted: the length stays
    assert lookup.lengths == [6]
    assert lookup.beams(torch.tensor([[[6, 0]]]), lookup_len=1, ngram_len=1).tolist() == [[[6, 0]] * 3]  # none
    assert lookup.beams(torch.tensor([[[6, 0]]]))[0, 1].tolist() == [6, 1, 2, 3, 4, 5]  # uncut: its own length
