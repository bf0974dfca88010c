"""The choice between speculative and plain steps (the server's, and ``generate``'s by default): a fixed
threshold, or measured; and that the decode loop stays lossless whichever it takes."""

from __future__ import annotations

import copy
import json
import random

import pytest
from conftest import tiny_target
from test_parity import hf_greedy, random_drafter, random_prompt, speculative

from redrafter.decode import DrafterProposer, RunningBatch, SpeculativeDecoder, TreeKind
from redrafter.ngrams import build_table
from redrafter.sampling import SamplingParams, TokenChooser
from redrafter.step_policy import PairWindow, SpeculationPolicy


def serve(
    policy: SpeculationPolicy,
    rows: list[int],
    steps: int,
    tree_rate: float,
    plain_rate: float,
    seed: int = 0,
    accepts: tuple[int, int] = (1, 5),
    greedy: bool = True,
):
    """Run ``steps`` steps over ``rows`` on a machine where a tree step takes the time that gives
    ``tree_rate`` tokens per second when each row emits 3 tokens (what a row emits is drawn from
    ``accepts``, so it varies from step to step and need not average 3) and a plain step gives
    ``plain_rate``. Returns the share of tree steps, the tokens per second the steps gave, and the
    seconds spent on each kind. ``greedy``: whether the rows decode greedily."""
    draw = random.Random(seed)
    size = len(rows)
    trees, tokens, spent = 0, 0, {True: 0.0, False: 0.0}
    for _ in range(steps):
        speculate = policy.choose(rows, greedy)
        if speculate:
            trees += 1
            emitted = [draw.randint(*accepts) for _ in rows]
            took = 3 * size / tree_rate  # a step's time does not depend on acceptance
        else:
            emitted, took = [1] * size, size / plain_rate
        policy.record(rows, speculate, emitted, took)
        tokens, spent[speculate] = tokens + sum(emitted), spent[speculate] + took
    return trees / steps, tokens / sum(spent.values()), spent


def test_a_fixed_threshold_never_measures():
    policy = SpeculationPolicy(prior=2, adaptive=False)
    assert [policy.choose(list(range(b))) for b in (1, 2, 3, 8)] == [True, True, False, False]
    share, _, _ = serve(policy, [0], 100, tree_rate=10.0, plain_rate=50.0)
    assert share == 1.0 and policy.seconds == {} and policy.table() == {}


def test_a_lone_row_takes_the_tree_every_step_and_more_rows_are_measured():
    """``lone_tree``: one row takes the tree even where plain steps were measured faster; from two rows
    the measured choice applies (here plain steps, the faster)."""
    policy = SpeculationPolicy(prior=2, lone_tree=True)
    share, _, _ = serve(policy, [0], 300, tree_rate=20.0, plain_rate=50.0)
    assert share == 1.0
    share, _, spent = serve(policy, [0, 1], 1000, tree_rate=20.0, plain_rate=50.0)
    assert share < 0.5 and spent[True] < 0.1 * (spent[True] + spent[False])
    assert [SpeculationPolicy(lone_tree=True, adaptive=False, prior=0).choose([0])] == [0]  # a fixed threshold rules
    # A lone sampled row is measured like more rows: plain steps, the faster here.
    share, _, _ = serve(SpeculationPolicy(prior=2, lone_tree=True), [0], 1000, 20.0, 50.0, greedy=False)
    assert share < 0.5


@pytest.mark.parametrize(
    "batch_size,tree_rate,plain_rate",
    [(1, 60.0, 33.0), (2, 70.0, 90.0), (4, 60.0, 100.0), (6, 160.0, 120.0)],  # the prior is wrong at 2 and 6
)
def test_measured_choice_settles_on_the_faster_kind(batch_size, tree_rate, plain_rate):
    policy = SpeculationPolicy(prior=2)
    _, rate, spent = serve(policy, list(range(batch_size)), 1000, tree_rate, plain_rate)
    share = spent[True] / (spent[True] + spent[False])  # of the time
    faster_is_tree = tree_rate > plain_rate
    assert (share > 0.9) if faster_is_tree else (share < 0.1), share
    assert rate > 0.93 * max(tree_rate, plain_rate)  # warm-up and exploration cost little
    measured = policy.table()[str(batch_size)]
    assert measured["tree_steps"] > 0 and measured["plain_steps"] > 0  # both kinds kept measured


def test_the_choice_follows_a_change_of_load():
    """What was true at a batch size can change (longer contexts, other prompts): exploration sees it."""
    policy = SpeculationPolicy(prior=2)
    _, _, spent = serve(policy, [0, 1, 2], 500, tree_rate=120.0, plain_rate=80.0)
    assert spent[True] > 0.9 * (spent[True] + spent[False])
    _, _, spent = serve(policy, [0, 1, 2], 500, tree_rate=60.0, plain_rate=80.0, seed=1)
    assert spent[True] < 0.2 * (spent[True] + spent[False])


def test_a_clear_loser_gets_a_small_share_of_the_time():
    """Tree steps here take 2.7 plain ones and give twice the tokens per second: plain steps are
    explored for about a quarter of ``explore_share`` of the time, however short they are."""
    policy = SpeculationPolicy(prior=1)
    _, _, spent = serve(policy, [0], 2000, tree_rate=160.0, plain_rate=80.0)
    share = spent[False] / (spent[True] + spent[False])
    assert 0.5 * policy.explore_share / 4 < share < 2 * policy.explore_share / 4, share


def test_a_dear_tree_that_won_below_is_explored_a_small_share_of_the_time():
    """The tree wins at 4 rows, so nothing rules it out at 16, where one of its steps takes 5 plain
    ones and gives 60% of their tokens per second: exploring it costs about a quarter of
    ``explore_share`` of the time (a retry every 128 steps, whatever it cost, spent 4% on it)."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 300, tree_rate=90.0, plain_rate=60.0)
    _, _, spent = serve(policy, list(range(16)), 3000, tree_rate=96.0, plain_rate=160.0, accepts=(3, 3))
    assert spent[True] / (spent[True] + spent[False]) < 0.025, spent


def test_exploring_long_tree_steps_costs_little():
    """At four rows a tree step here takes 4.4 plain ones: exploring one step in 16 (as counted in
    steps) would spend a fifth of the time on trees, 6% of the throughput."""
    policy = SpeculationPolicy(prior=4)
    share, rate, _ = serve(policy, [0, 1, 2, 3], 2000, tree_rate=55.0, plain_rate=80.0)
    assert share < 0.02 and rate > 0.98 * 80.0


def test_one_slow_step_does_not_turn_the_choice():
    """A step slowed by something else on the machine (a 20x outlier) would hold a mean of step times
    up for as long as only exploration refreshes it; the median ignores it."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0], 100, tree_rate=60.0, plain_rate=30.0)
    policy.record([0], True, [3], 20 * 3 / 60.0)  # one tree step 20 times slower than usual
    share, _, _ = serve(policy, [0], 300, tree_rate=60.0, plain_rate=30.0, seed=2)
    assert share > 0.95


def test_a_row_that_drafts_badly_turns_to_plain_steps_within_a_few_steps():
    """A tree step takes two plain ones: a row emitting 4 tokens a tree step wants trees, one
    emitting 1 wants plain steps. A mean shared by all rows over 64 steps would keep the bad row on
    trees for 41 steps; its own estimate turns it in 14, and the next row starts afresh. While it
    takes plain steps its own steps grow stale, so it is tried a little more often than exploration
    alone would."""
    policy = SpeculationPolicy(prior=1)
    share, _, _ = serve(policy, [0], 200, tree_rate=49.5, plain_rate=33.0, accepts=(4, 4))
    assert share > 0.95
    policy.forget(0)
    assert 0 not in policy.rows_accepted
    share, _, _ = serve(policy, [1], 200, tree_rate=49.5, plain_rate=33.0, accepts=(1, 1))
    assert share < 0.15, share  # 14 tree steps to learn the row, then exploration
    policy.forget(1)
    assert policy.choose([2])  # a new row starts at the mean of recent steps, mostly good ones


def test_a_rows_own_steps_grow_stale_while_it_takes_other_kinds():
    """A row whose last tree steps were poor stops taking trees, so nothing would refresh the estimate
    that stopped it: each step since one told the tree's tokens adds ``stale_weight`` steps of all
    rows' mean to the row's estimate, and the next tree step (or a tree that tells it) resets that."""
    estimates = {}
    for stale_weight in (0.5, 0.0):
        policy = SpeculationPolicy(prior=1, stale_weight=stale_weight)
        serve(policy, [0], 200, tree_rate=49.5, plain_rate=33.0, accepts=(4, 4))
        policy.forget(0)
        for _ in range(20):
            policy.record([1], 1, [1], 0.06)
        prior, before = policy.expected(1, 1), policy.row_estimate(1)
        assert before == pytest.approx((20 + policy.prior_steps * prior) / (20 + policy.prior_steps))
        for _ in range(40):
            policy.record([1], 0, [1], 0.03)
        assert policy.expected(1, 1) == prior and policy.stale[1] == {1: 40}
        weight = policy.prior_steps + stale_weight * 40
        estimates[stale_weight] = policy.row_estimate(1)
        assert estimates[stale_weight] == pytest.approx((20 + weight * prior) / (20 + weight))
        policy.forget(1)
        assert 1 not in policy.stale
    assert estimates[0.0] < estimates[0.5] < prior  # without staleness the poor steps keep their weight

    policy = SpeculationPolicy(prior=1, kinds=("plain", "tree", "small_tree"))
    policy.record([1], 0, [1], 0.03)
    assert policy.stale[1] == {1: 1, 2: 1}
    policy.record([1], 1, [1], 0.06, nested={2: [1]})  # a tree step tells both trees' tokens
    assert policy.stale[1] == {1: 0, 2: 0}
    policy.record([1], 2, [1], 0.04)  # a small-tree step tells only its own
    assert policy.stale[1] == {1: 1, 2: 0}


def test_trees_are_not_tried_above_a_batch_size_where_they_lost():
    """A server passes through many batch sizes; trying a tree step at each (one over 16 rows takes
    as long as 8 plain steps) cost a fifth of the throughput at 16 streams."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 500, tree_rate=55.0, plain_rate=80.0)
    for size in range(5, 17):
        share, _, _ = serve(policy, list(range(size)), 20, tree_rate=60.0, plain_rate=20.0 * size)
        assert share == 0.0, size
    share, _, _ = serve(policy, [0, 1, 2], 50, tree_rate=100.0, plain_rate=60.0)  # below: still measured
    assert share > 0.5


@pytest.mark.parametrize("ahead,tree_share", [(1.05, "low"), (1.25, "high")])
def test_a_tree_is_chosen_over_plain_steps_only_with_a_lead(ahead, tree_share):
    """A tree estimated a few percent ahead of plain steps may well be behind (its acceptance and its
    time are estimates; plain steps emit one token a row): plain steps lose nothing to a plain server,
    so a near-tie goes to them. A tree clearly ahead is still chosen."""
    policy = SpeculationPolicy(prior=2)
    rows = list(range(16))
    _, _, spent = serve(policy, rows, 600, tree_rate=ahead * 150.0, plain_rate=150.0, accepts=(3, 3))
    share = spent[True] / (spent[True] + spent[False])
    assert (share < 0.15) if tree_share == "low" else (share > 0.85), share


def test_a_machine_whose_speed_moves_does_not_turn_the_choice():
    """At 16 rows a tree step takes 1.6 plain ones and each row emits 1.5 tokens in it: plain steps
    are faster. The machine's speed moves by 60% every 60 steps (as this one's does within a round).
    Timed apart, the tree explored while the machine was fast looked faster than plain steps timed
    while it was slow; timed against the step just before it, it costs 1.6 whenever it ran, and is
    taken about as often as exploring it takes (1/16 of the time)."""
    draw = random.Random(0)
    policy, rows, spent = SpeculationPolicy(prior=2), list(range(16)), {0: 0.0, 1: 0.0}
    for step in range(3000):
        kind = policy.choose(rows)
        seconds = 0.1 * (1.6 if (step // 60) % 2 else 1.0) * draw.uniform(0.9, 1.1) * (1.6 if kind else 1.0)
        policy.record(rows, kind, [draw.randint(1, 2) for _ in rows] if kind else [1] * 16, seconds)
        spent[kind] += seconds
    assert spent[1] / (spent[0] + spent[1]) < 0.1, spent  # 0.15 timing each kind apart


def serve_kinds(policy: SpeculationPolicy, rows: list[int], steps: int, kinds: dict[int, tuple[float, tuple]]):
    """Run ``steps`` steps over ``rows`` where a step of kind ``k`` takes ``kinds[k][0]`` seconds and
    each row emits a number of tokens drawn from ``kinds[k][1]``. Returns the seconds spent on each
    kind and the tokens per second the steps gave."""
    draw = random.Random(0)
    spent, tokens = dict.fromkeys(kinds, 0.0), 0
    for _ in range(steps):
        kind = policy.choose(rows)
        took, accepts = kinds[kind]
        emitted = [draw.randint(*accepts) for _ in rows]
        policy.record(rows, kind, emitted, took)
        spent[kind], tokens = spent[kind] + took, tokens + sum(emitted)
    return spent, tokens / sum(spent.values())


@pytest.mark.parametrize(
    "kinds,fastest",
    [
        # where a wide forward is dear (no bfloat16 instructions, int4): the small tree wins (31 tokens/s
        # against 20 plain and 12 for the tree)
        ({0: (0.05, (1, 1)), 1: (0.25, (2, 4)), 2: (0.065, (1, 3))}, 2),
        # where it is cheap: the tree (40 against 20 plain and 25 for the small tree)
        ({0: (0.05, (1, 1)), 1: (0.1, (3, 5)), 2: (0.06, (1, 2))}, 1),
        # a prompt no draft follows: plain steps
        ({0: (0.05, (1, 1)), 1: (0.1, (1, 1)), 2: (0.06, (1, 1))}, 0),
    ],
)
def test_the_choice_among_a_tree_a_small_tree_and_plain_steps_settles_on_the_fastest(kinds, fastest):
    policy = SpeculationPolicy(kinds=("plain", "tree", "small_tree"))
    spent, rate = serve_kinds(policy, [0], 1500, kinds)
    assert spent[fastest] > 0.9 * sum(spent.values()), spent
    best_rate = max(sum(accepts) / 2 / took for took, accepts in kinds.values())
    assert rate > 0.9 * best_rate
    measured = policy.table()["1"]
    assert all(measured[f"{name}_steps"] > 0 for name in policy.kinds)  # every kind kept measured


def test_a_kind_measured_while_the_machine_was_busy_is_taken_again():
    """Tree steps each slowed 4x by something else on the machine (plain ones not) measure the tree
    a clear loser. Exploring a clear loser a quarter of ``explore_share`` of the time retries it
    after about 60 times its measured step time; retries at its real cost bring its median of pairs
    back within a few (here three, about 300 steps apart: the tree runs again from step 901). (A
    fixed retry every 128 steps came back sooner, but at 16 rows it spent 4% of the time on tree
    steps that lose to plain ones by 5x.)"""
    policy = SpeculationPolicy(kinds=("plain", "tree", "small_tree"))
    busy = {0: (0.05, (1, 1)), 1: (0.25, (2, 4)), 2: (0.06, (1, 2))}
    serve_kinds(policy, [0], 60, busy)
    quiet = {0: (0.04, (1, 1)), 1: (0.06, (2, 4)), 2: (0.041, (1, 2))}  # 25, 50 and 37 tokens/s
    choices = []
    for _ in range(1200):
        choices.append(policy.choose([0]))
        took, accepts = quiet[choices[-1]]
        policy.record([0], choices[-1], [sum(accepts) // 2], took)
    assert choices.index(1) <= 400 and choices[-200:].count(1) > 180, choices


class Cycling(SpeculationPolicy):
    """A policy that takes the tree, a plain step and the small tree in turn, and notes its choices."""

    def __init__(self) -> None:
        super().__init__(kinds=("plain", "tree", "small_tree"))
        self.choices: list[int] = []

    def choose(self, rows, greedy: bool = True) -> int:
        self.choices.append((1, 0, 2)[len(self.choices) % 3])
        return self.choices[-1]


@pytest.mark.parametrize("policy", [Cycling, SpeculationPolicy])
def test_decoding_with_a_policy_stays_plain_greedy(family, policy):
    """Tree, small-tree and plain steps mixed in one decode (a batch of mixed lengths) give plain
    greedy's tokens (float64); each call forgets its rows, so none carries its acceptance into the next call."""
    model = tiny_target(family)
    chooser = policy() if policy is Cycling else policy(kinds=("plain", "tree", "small_tree"))
    drafter = random_drafter(model, seed=4)
    proposer = DrafterProposer(drafter, 3, 4, tree_nodes=6)
    small = TreeKind(DrafterProposer(drafter, 1, 2), lookup_len=2, ngram_len=0)
    decoder = SpeculativeDecoder(model, proposer, [], lookup_len=5, policy=chooser, small_tree=small)
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (2, 9)]
    ids, _ = speculative(decoder, prompts, 40)
    assert ids == [hf_greedy(model, p, 40) for p in prompts]
    assert not chooser.rows_accepted
    assert sum(window.count for window in chooser.seconds.values()) >= 5  # every step was recorded
    if policy is Cycling:
        assert {0, 1, 2} <= set(chooser.choices)
        assert {kind for _, kind in chooser.seconds} == {0, 1, 2}
    steps = decoder.decode(prompts, 40)
    next(steps), next(steps)  # stopped early: the rows still leave the policy
    steps.close()
    assert not chooser.rows_accepted


def test_only_the_small_tree_cuts_the_lookup_beams():
    """The tree keeps each row's own lookup length (it doubles while a span is copied); the small
    tree cuts both lookup beams to its own; a plain step drafts none."""
    model = tiny_target("llama")
    drafter = random_drafter(model, seed=4)
    small = TreeKind(DrafterProposer(drafter, 1, 2), lookup_len=2, ngram_len=0)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 2, 3), [], lookup_len=3, small_tree=small)
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    batch.add([random_prompt(3, 12) * 2], [20])
    lookup, calls = batch.rows.lookup, []
    beams = lookup.beams
    lookup.beams = lambda drafted, lookup_len=None, ngram_len=None: (
        calls.append((lookup_len, ngram_len)) or beams(drafted, lookup_len, ngram_len)
    )
    for kind in (1, 2, 0, True):
        batch.step(kind)
    assert calls == [(None, None), (2, 0), (None, None)]


@pytest.mark.parametrize("beams,draft_len,tree_nodes", [(3, 4, 6), (1, 3, 0)])
def test_a_tree_step_tells_what_the_small_tree_would_have_emitted(beams, draft_len, tree_nodes):
    """A most-probable-first tree (a dynamic one, or one beam) holds the small tree's depth-1 tokens:
    the drafter's first choice and each lookup beam's first token. So each tree step gives, per row,
    the tokens a small-tree step from the same state emits (float64: the same choices), hits (2)
    and misses (1) alike."""
    model = tiny_target("llama")
    drafter = random_drafter(model, seed=5)
    prompts = [random_prompt(4, 20 + n) * 3 for n in range(3)]
    table = build_table([p + hf_greedy(model, p, 30) for p in prompts], min_n=1, max_n=3, min_count=1)
    drafter.ngrams = table
    small = TreeKind(DrafterProposer(drafter, 1, 2), lookup_len=2, ngram_len=2)
    proposer = DrafterProposer(drafter, beams, draft_len, tree_nodes)
    decoder = SpeculativeDecoder(model, proposer, [], 5, ngrams=table, ngram_len=3, small_tree=small)
    assert decoder.small_tree_nested
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    batch.add(prompts, [24, 30, 16])
    seen = []
    while batch.size:
        twin = copy.copy(batch)
        twin.rows, twin.budget, twin.emitted = copy.deepcopy(batch.rows), dict(batch.budget), dict(batch.emitted)
        out, alone = batch.step(1), twin.step(2)
        assert out.nested == {2: [len(tokens) for tokens in alone.tokens]}
        assert not twin.step(0).nested and not alone.nested  # only a tree step tells
        seen += out.nested[2]
    assert {1, 2} <= set(seen)


def test_a_tree_that_may_not_hold_the_small_trees_tokens_tells_nothing():
    """The best of three final beams need not start with the drafter's first choice."""
    model = tiny_target("llama")
    drafter = random_drafter(model, seed=5)
    small = TreeKind(DrafterProposer(drafter, 1, 2), lookup_len=2, ngram_len=0)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4), [], 5, small_tree=small)
    assert not decoder.small_tree_nested
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    batch.add([random_prompt(4, 7) * 3], [8])
    assert not batch.step(1).nested


def test_the_small_tree_learns_its_acceptance_from_tree_steps_but_not_its_time():
    policy = SpeculationPolicy(kinds=("plain", "tree", "small_tree"))
    for _ in range(4):
        policy.record([0, 1], 1, [3, 4], 0.2, {2: [2, 1]})
    assert policy.accepted[1].mean == 3.5 and policy.accepted[2].mean == 1.5
    assert policy.row_estimate(0, 2) > 1.5 > policy.row_estimate(1, 2)  # each row its own, shrunk to the mean
    policy.record([0, 1], 0, [1, 1], 0.05)
    assert (2, 2) not in policy.seconds and policy.choose([0, 1]) == 2  # its time is still to be measured


def test_a_pair_window_fits_the_line_through_its_latest_pairs():
    pairs = PairWindow(4)
    assert pairs.predict(1.5) is None
    pairs.add(1, 1)
    pairs.add(1, 2)
    assert pairs.predict(1.5) is None  # every x equal: no line
    for x, y in ((2, 5), (1, 1), (2, 3), (1, 1)):  # the first two pairs leave: y = 1 + 3 (x - 1)
        pairs.add(x, y)
    assert pairs.predict(1.0) == pytest.approx(1.0) and pairs.predict(2.0) == pytest.approx(4.0)
    assert pairs.predict(1.5) == pytest.approx(2.5)


def test_after_a_prompt_the_drafter_cannot_follow_the_tree_is_taken_again_on_easier_ones():
    """One row at a time: prompts the drafter follows, one it does not, then easy ones again (a tree
    step costs 1.42 plain ones, a small-tree step 1.05; on the hard prompt the tree emits what the
    small tree does, 1.25 tokens a step).

    - On the easy prompts after the hard one, the tree (3.2 tokens a step, against the small tree's
      1.9) is taken again. While the small tree or plain steps run, the tree's acceptance is not
      measured (only explored), so it is predicted from the small tree's. Judged on the tree's own
      steps of the hard prompt, those prompts stayed on the small tree for 95% and 94% of their steps.
    - On the hard prompt, the small tree (19% faster than plain steps there) is taken, though all
      rows' recent steps put the tree first among the shapes; before, the choice was then between the
      tree and plain steps only, and plain steps took 79% of the prompt's steps."""
    cost = {0: 1.0, 1: 1.42, 2: 1.05}
    policy = SpeculationPolicy(kinds=("plain", "tree", "small_tree"))
    draw = random.Random(2)
    shares = []  # per prompt: the share of each kind's steps
    for row, easy in enumerate((True, True, False, True, True)):
        emitted_in_all, kinds = 0, []
        while emitted_in_all < 400:
            kind = policy.choose([row])
            small = 2 if draw.random() < (0.9 if easy else 0.25) else 1
            if easy:
                tree = draw.choice((2, 3, 4, 5)) if small == 2 else draw.choice((1, 1, 2))
            else:
                tree = small
            emitted = (1, tree, small)[kind]
            policy.record([row], kind, [emitted], cost[kind], {2: [small]} if kind == 1 else None)
            emitted_in_all, kinds = emitted_in_all + emitted, kinds + [kind]
        policy.forget(row)
        shares.append([kinds.count(kind) / len(kinds) for kind in range(3)])
    assert min(share[1] for share in shares[:2]) > 0.8 and min(share[1] for share in shares[3:]) > 0.7, shares
    assert shares[2][2] > 0.6, shares


def test_a_policy_of_more_kinds_than_the_decoder_takes_is_refused():
    model = tiny_target("llama")
    proposer = DrafterProposer(random_drafter(model, seed=4), 2, 3)
    with pytest.raises(ValueError, match="small_tree"):
        SpeculativeDecoder(model, proposer, [], policy=SpeculationPolicy(kinds=("plain", "tree", "small_tree")))


def test_generate_adapts_by_default(model_dir, drafter_dir, capsys):
    from redrafter.api import ReDrafter
    from redrafter.cli import main

    two = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32")  # float weights: no small tree
    assert two.decoder.policy.kinds == two.decoder.kinds == ("plain", "tree")
    adaptive = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32", small_tree=True)
    assert adaptive.decoder.policy.kinds == adaptive.decoder.kinds == ("plain", "tree", "small_tree")
    small = adaptive.decoder.trees[1]
    assert (small.proposer.num_beams, small.proposer.draft_len, small.lookup_len, small.ngram_len) == (1, 2, 2, 2)
    assert small.proposer.drafter is adaptive.decoder.proposer.drafter  # one drafter, two shapes
    tiny = ReDrafter.from_pretrained(  # a tree no larger than the small one: nothing smaller to choose
        model_dir,
        drafter=drafter_dir,
        dtype="float32",
        small_tree=True,
        num_beams=1,
        draft_len=2,
        lookup_len=0,
        ngram_len=0,
        tree_nodes=0,
    )
    assert tiny.decoder.kinds == ("plain", "tree")
    fixed = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32", adaptive=False)
    assert fixed.decoder.policy is None and not fixed.adaptive and fixed.decoder.kinds == ("plain", "tree")
    assert ReDrafter.from_pretrained(model_dir, drafter="none", dtype="float32").decoder.policy is None
    argv = ["generate", "the cat", "--model", str(model_dir), "--drafter", str(drafter_dir), "--dtype", "float32"]
    assert main([*argv, "--speculation", "always", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    assert main([*argv, "--json", "--max-new-tokens", "8"]) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]["1"]  # what the choice measured, for one row
    assert policy["tree_steps"] + policy["plain_steps"] > 0 and "small_tree_steps" not in policy
    assert main([*argv, "--json", "--max-new-tokens", "24", "--small-tree"]) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]["1"]
    assert policy["tree_steps"] + policy["plain_steps"] + policy["small_tree_steps"] > 0
    with pytest.raises(SystemExit) as refused:
        main([*argv, "--speculation", "sometimes"])
    assert refused.value.code == 2


def test_one_slow_step_at_a_smaller_size_does_not_rule_a_tree_out_above():
    """Rows finishing pass through a size once or twice: one tree step there, slowed by something
    else on the machine, is no verdict on the sizes above, where the tree keeps winning."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 300, tree_rate=90.0, plain_rate=60.0)  # the tree wins at 4 rows
    serve(policy, [0, 1, 2], 1, tree_rate=10.0, plain_rate=50.0)  # the guess at 3 rows: a tree step, slow
    serve(policy, [0, 1, 2], 1, tree_rate=10.0, plain_rate=50.0)  # then a plain step
    assert policy.table()["3"]["tree_steps"] == 1 and policy.table()["3"]["plain_steps"] == 1
    share, _, _ = serve(policy, [0, 1, 2, 3], 100, tree_rate=90.0, plain_rate=60.0)
    assert share > 0.8, share


def test_a_tree_that_lost_below_is_not_explored_where_it_was_measured_before():
    """A server's first round measures 16 rows before 5 (its rows finish one by one); once the tree
    lost at 5 rows, 16 rows are served by plain steps alone, not explored now and then."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 300, tree_rate=90.0, plain_rate=60.0)  # the tree wins at 4 rows
    rows = list(range(16))
    serve(policy, rows, 10, tree_rate=60.0, plain_rate=320.0)  # tried and lost at 16
    serve(policy, list(range(5)), 100, tree_rate=55.0, plain_rate=75.0)  # lost at 5
    share, _, _ = serve(policy, rows, 600, tree_rate=60.0, plain_rate=320.0)
    assert share == 0.0, share


def test_a_fresh_server_at_many_rows_learns_the_acceptance_from_one_tree_step():
    """One tree step over 16 rows measures 16 rows' acceptance: enough to judge the tree, which at
    16 rows loses clearly, so it is not given the warm-up's quarter of the time until 8 steps."""
    policy = SpeculationPolicy(prior=2)
    share, _, _ = serve(policy, list(range(16)), 120, tree_rate=60.0, plain_rate=320.0)
    assert share * 120 == 1, share  # the step that measured it


def test_a_tree_is_not_tried_where_the_sizes_around_predict_it_loses():
    """Rows that joined together finish one by one: the server meets 15, 14, ... rows from above.
    Where the tree's step time, interpolated between 4 rows (where it wins) and 16 (where it loses),
    makes it slower than the plain steps measured there, it is not tried."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 300, tree_rate=90.0, plain_rate=60.0)  # 0.13 s a tree step: wins
    serve(policy, list(range(16)), 30, tree_rate=60.0, plain_rate=320.0)  # 0.8 s: loses
    tried = []
    for size in range(15, 4, -1):
        tree_seconds = 12 / 90 + (size - 4) * (0.8 - 12 / 90) / 12  # what the sizes around predict
        share, _, _ = serve(policy, list(range(size)), 10, tree_rate=3 * size / tree_seconds, plain_rate=size / 0.06)
        tried.append(share > 0)
    assert not any(tried), tried
    # Where the prediction is that it wins, it is tried: a faster tree at 4 and 16 rows.
    policy = SpeculationPolicy(prior=2)
    serve(policy, [0, 1, 2, 3], 300, tree_rate=90.0, plain_rate=60.0)
    serve(policy, list(range(16)), 200, tree_rate=400.0, plain_rate=320.0)
    share, _, _ = serve(policy, list(range(10)), 20, tree_rate=300.0, plain_rate=200.0)
    assert share > 0
