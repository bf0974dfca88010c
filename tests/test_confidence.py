"""The confidence tree: its guesses against a brute-force search, the fitted grid against a hand count,
the count it keeps, the tree and beams it builds, and lossless greedy decoding through it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import tiny_target, word_tokenizer
from test_parity import hf_greedy, random_drafter, random_prompt, speculative

from redrafter.api import ReDrafter
from redrafter.bench import drafter_alone
from redrafter.confidence import (
    CONTEXT_ORDERS,
    CONTEXT_SIZES,
    GRID_SHAPE,
    PRIOR,
    PRIOR_WEIGHT,
    ConfidenceTree,
    best_count,
    candidates,
    cost,
    curve_at,
    fit_confidence,
    table_cell,
)
from redrafter.decode import SpeculativeDecoder, no_draft
from redrafter.errors import RedrafterError
from redrafter.lookup import index_tokens
from redrafter.ngrams import build_table
from redrafter.tree import PAD, build_tree

COSTS = (1.0, 1.02, 1.1, 1.2, 1.3, 1.45, 1.6)


def reference_candidates(history: list[int], table, path: list[int]) -> dict[int, tuple[int, int]]:
    """Brute force: per suffix of history + path (longest first, up to CONTEXT_ORDERS), the token after
    its latest occurrence inside history; then the table's follower of its longest known suffix."""
    sequence, found = history + path, {}
    for n in range(min(CONTEXT_ORDERS, len(sequence)), 0, -1):
        suffix = sequence[len(sequence) - n :]
        starts = [i for i in range(len(history) - n) if history[i : i + n] == suffix]
        if starts and history[max(starts) + n] not in found:
            found[history[max(starts) + n]] = [n, 0]
    proposal = table.longest(sequence)
    if proposal is not None:
        order, token, share = proposal
        found.setdefault(token, [0, 0])[1] = table_cell(order, share)
    return {token: tuple(cells) for token, cells in found.items()}


def grid_table(seed: int = 0, vocab: int = 5):
    """A table of random text with a made-up grid (every cell its own probability)."""
    rng = random.Random(seed)
    table = build_table([[rng.randrange(vocab) for _ in range(200)]], min_n=1, max_n=3, min_count=1)
    table.confidence = np.random.default_rng(seed).uniform(0.05, 0.95, GRID_SHAPE).astype(np.float32)
    return table


@pytest.mark.parametrize("seed", range(40))
def test_candidates_match_brute_force(seed):
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 9])
    table = build_table([[rng.randrange(vocab) for _ in range(80)]], min_n=rng.choice([1, 2]), max_n=4, min_count=1)
    history, index = [], {}
    index_tokens(history, index, [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))], CONTEXT_SIZES)
    for _ in range(4):
        path = [rng.randrange(vocab) for _ in range(rng.randrange(0, 4))]
        assert candidates(history, index, table, path) == reference_candidates(history, table, path)
        index_tokens(history, index, [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))], CONTEXT_SIZES)


def test_table_cells_split_order_and_share():
    assert table_cell(2, 0) == 1 and table_cell(3, 255) == 5  # orders 2-3: columns 1..5 by share
    assert table_cell(4, 0) == 6 and table_cell(6, 255) == 15  # 4-5 then 6 and more
    assert len({table_cell(n, s) for n in range(1, 9) for s in range(256)}) == GRID_SHAPE[1] - 1


def test_fitted_grid_is_the_shrunk_hit_rate_of_each_cell():
    rng = random.Random(1)
    table = build_table([[rng.randrange(4) for _ in range(300)]], min_n=2, max_n=3, min_count=1)
    pairs = [([rng.randrange(4) for _ in range(5)], [rng.randrange(4) for _ in range(60)]) for _ in range(6)]
    grid = fit_confidence(table, pairs)
    # A hand count of every guess over every answer position, through the brute-force guesses.
    seen: dict[tuple[int, int], list[int]] = {}
    for prompt, answer in pairs:
        history = list(prompt) + answer[:1]
        for token in answer[1:]:
            for guess, (context, column) in reference_candidates(history, table, []).items():
                for level in [(context, column), (context, -1 if column else 0), (context, -2)]:
                    counts = seen.setdefault(level, [0, 0])
                    counts[0] += 1
                    counts[1] += guess == token
            history.append(token)
    for context in range(GRID_SHAPE[0]):
        for column in range(GRID_SHAPE[1]):
            estimate = PRIOR
            for level in [(context, -2), (context, -1 if column else 0), (context, column)]:
                total, right = seen.get(level, (0, 0))
                estimate = (right + PRIOR_WEIGHT * estimate) / (total + PRIOR_WEIGHT)
            assert grid[context, column] == pytest.approx(estimate, rel=1e-6), (context, column)
    assert seen[(0, -2)][0] > 50 and any(c > 0 and t > 10 for (c, _), (t, _) in seen.items())  # cells were hit


def test_best_count_maximizes_expected_tokens_per_cost():
    rng = random.Random(0)
    for _ in range(200):
        rows = rng.choice([1, 1, 3, 8])
        probabilities = sorted((rows * rng.random() for _ in range(rng.randrange(0, 12))), reverse=True)
        rates = [(rows + sum(probabilities[:k])) / cost(COSTS, k + 1) for k in range(len(probabilities) + 1)]
        assert best_count(probabilities, COSTS, rows) == rates.index(max(rates))
    assert cost(COSTS, 9) == pytest.approx(COSTS[-1] + 2 * (COSTS[-1] - COSTS[-2]))  # extended by its last step


@pytest.mark.parametrize("seed", range(10))
def test_tree_nodes_come_best_first_with_path_probabilities(seed):
    table = grid_table(seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(5) for _ in range(30)]
    tree = ConfidenceTree([prompt], table, COSTS, max_nodes=10)
    nodes = tree.nodes(0, 10, COSTS)
    paths = [path for path, _ in nodes]
    assert len(set(paths)) == len(paths)
    for k, (path, probability) in enumerate(nodes):
        assert path[:-1] == () or path[:-1] in paths[:k]  # its parent came before it
        expected = 1.0
        for depth in range(len(path)):
            cell = candidates(prompt, tree.indexes[0], table, list(path[:depth]))[path[depth]]
            expected *= float(table.confidence[cell])
        assert probability == pytest.approx(expected, rel=1e-12)
    probabilities = [p for _, p in nodes]
    assert probabilities == sorted(probabilities, reverse=True)
    kept = best_count(probabilities, COSTS)
    assert len(nodes) >= kept
    beams = tree.beams(torch.tensor([[[prompt[-1]]]]))
    assert int(build_tree(beams).num_nodes[0]) == 1 + kept  # a row alone keeps what best_count says


def test_beams_hold_the_tree_leaves_and_repeat_beam_zero_where_fewer():
    table = grid_table(3)
    table.confidence[:] = 0.9  # every guess looks good: deep trees
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [4]]
    tree = ConfidenceTree(prompts, table, (1.0,) * 12, max_nodes=6, max_positions=None)
    drafted = torch.tensor([[[2]], [[4]]])  # no drafted beams: the roots
    beams = tree.beams(drafted)  # [B, 1 + E, M]
    assert beams.shape[1] == 1 + tree.extra_beams
    for row in range(2):
        nodes = {path for path, _ in tree.nodes(row, 6, (1.0,) * 12)}
        packed = build_tree(beams[row : row + 1])
        assert int(packed.num_nodes[0]) == 1 + len(nodes)
        leaves = [tuple(t for t in beam[1:] if t != PAD) for beam in beams[row, 1:].tolist()]
        assert {leaf for leaf in leaves if leaf} == {
            p for p in nodes if not any(q[: len(p)] == p and q != p for q in nodes)
        }
    assert (beams[1, 1:, 0] == 4).all()  # a row with fewer leaves repeats its root beam
    cut = tree.beams(drafted, lookup_len=2, ngram_len=2)  # a small tree's cut: depth 1
    assert (cut[:, :, 2:] == PAD).all() if cut.shape[2] > 2 else True
    near_end = ConfidenceTree([[1, 2, 1, 2, 1, 2]], table, (1.0,) * 12, max_nodes=6, max_positions=8)
    assert near_end.beams(torch.tensor([[[2]]])).shape[2] <= 1 + 2  # positions 6 and 7 left


def test_curve_at_picks_or_interpolates_the_batch_size():
    curves = {1: (1.0, 1.1), 4: (1.0, 1.5, 2.0), 8: (1.0, 2.0, 3.0)}
    assert curve_at(COSTS, 16) == list(COSTS)  # one curve serves every batch size
    assert curve_at(curves, 1) == [1.0, 1.1] and curve_at(curves, 4) == [1.0, 1.5, 2.0]
    assert curve_at(curves, 6) == pytest.approx([1.0, 1.75, 2.5])  # halfway between 4 and 8
    assert curve_at(curves, 2) == pytest.approx([1.0, 1.1 + 0.4 / 3, 1.2 + 0.8 / 3])  # 1's curve extended
    assert curve_at(curves, 64) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("seed", range(6))
def test_rows_keep_the_count_that_pays_over_the_whole_batch(seed):
    """Over several rows every row keeps its k most probable nodes, k maximizing the rows' expected tokens
    per the cost of that batch size's forward (brute force over k and the rows' own node lists)."""
    table = grid_table(seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(5, 40))] for _ in range(rng.randrange(2, 6))]
    curves = {1: COSTS, 2: (1.0, 1.15, 1.4, 1.7, 2.0), 8: (1.0, 1.6, 2.2, 2.8, 3.4)}
    tree = ConfidenceTree(prompts, table, curves, max_nodes=8)
    batch = len(prompts)
    costs = curve_at(curves, batch)
    lists = [[p for _, p in tree.nodes(row, 8, costs)] for row in range(batch)]
    rates = [
        (batch + sum(sum(nodes[:k]) for nodes in lists)) / cost(costs, k + 1) for k in range(max(map(len, lists)) + 1)
    ]
    keep = rates.index(max(rates))
    beams = tree.beams(torch.tensor([[[prompt[-1]]] for prompt in prompts]))
    packed = build_tree(beams)
    assert packed.num_nodes.tolist() == [1 + min(keep, len(nodes)) for nodes in lists]


def test_a_dear_second_token_leaves_a_plain_step():
    table = grid_table(1)
    table.confidence[:] = 0.5  # every guess right half of the time
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2]] * 4
    curves = {1: (1.0, 1.1, 1.2), 4: (1.0, 1.6, 2.2)}  # over four rows a second token costs 0.6 of a step
    drafted = torch.tensor([[[2]]] * 4)
    assert tuple(ConfidenceTree(prompts, table, curves, max_nodes=4).beams(drafted).shape) == (4, 1, 1)
    alone = ConfidenceTree(prompts[:1], table, curves, max_nodes=4).beams(drafted[:1])
    assert alone.shape[1] > 1  # one row alone still takes a tree


def test_a_table_without_a_grid_is_refused():
    table = build_table([[1, 2, 3, 1, 2]], min_n=1, max_n=2, min_count=1)
    with pytest.raises(RedrafterError, match="no confidence grid"):
        ConfidenceTree([[1]], table, COSTS, 4)
    model = tiny_target("llama", seed=1)
    with pytest.raises(ValueError, match="confidence grid"):
        SpeculativeDecoder(model, no_draft, [], ngrams=table, lookup_nodes=4, node_costs=COSTS)


def test_the_api_refuses_lookup_nodes_without_a_grid():
    model = tiny_target("llama", seed=2)
    drafter = random_drafter(model, seed=2)
    drafter.ngrams = build_table([[1, 2, 3, 1, 2]], min_n=1, max_n=2, min_count=1)
    with pytest.raises(
        RedrafterError, match="--lookup-nodes needs a drafter whose n-gram table holds a confidence grid"
    ):
        ReDrafter(model, word_tokenizer(), drafter, num_beams=1, lookup_nodes=4)
    with pytest.raises(RedrafterError, match="--lookup-nodes must be 0 or more"):
        ReDrafter(model, word_tokenizer(), drafter, num_beams=1, lookup_nodes=-1)
    drafter.ngrams.confidence = np.full((3, 3), 0.5, dtype=np.float32)  # a grid of another layout: refused now
    with pytest.raises(RedrafterError, match=r"confidence grid is \(3, 3\), not \(7, 16\)"):
        ReDrafter(model, word_tokenizer(), drafter, num_beams=1, lookup_nodes=4)
    drafter.ngrams.confidence = np.full(GRID_SHAPE, 0.5, dtype=np.float32)
    engine = ReDrafter(model, word_tokenizer(), drafter, num_beams=0, lookup_nodes=4, lookup_len=0, ngram_len=0)
    assert engine.decoder.lookup_nodes == 4  # the tree alone is a valid draft (no --beams, no lookup beams)
    alone = drafter_alone(engine)  # bench's redrafter-nolookup: the drafter's own tree, nothing looked up
    assert (alone.num_beams, alone.draft_len, alone.tree_nodes) == (6, 4, 9)
    assert (alone.lookup_len, alone.ngram_len, alone.lookup_nodes) == (0, 0, 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_confidence_tree_keeps_greedy_parity_in_a_batch(family):
    model = tiny_target(family, seed=5)
    prompts = [random_prompt(n // 3 + 1, 300 + n) * 3 for n in (2, 9, 17)]  # repeated text: the context guesses
    corpus = [hf_greedy(model, random_prompt(5, s), 30) for s in range(4)] + [hf_greedy(model, prompts[0], 10)]
    table = build_table(corpus, min_n=1, max_n=4, min_count=1)
    table.confidence = fit_confidence(table, [(p, hf_greedy(model, p, 20)) for p in (random_prompt(4, 77), prompts[1])])
    expected = [hf_greedy(model, prompt, 24) for prompt in prompts]
    for costs in (COSTS, {1: COSTS, 2: (1.0, 1.1, 1.2, 1.3), 3: (1.0, 1.2, 1.4, 1.6)}):
        decoder = SpeculativeDecoder(model, no_draft, [], ngrams=table, lookup_nodes=8, node_costs=costs)
        ids, per_step = speculative(decoder, prompts, 24)
        assert ids == expected
        assert max(per_step) > 2  # trees were accepted beyond one drafted token
