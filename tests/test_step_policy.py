"""The server's choice between speculative and plain steps: a fixed threshold, or measured."""

from __future__ import annotations

import random

import pytest

from redrafter.step_policy import SpeculationPolicy


def serve(policy: SpeculationPolicy, batch_size: int, steps: int, tree_rate: float, plain_rate: float, seed: int = 0):
    """Run ``steps`` steps at ``batch_size`` on a machine where a tree step emits ``tree_rate``
    tokens per second on average (its tokens vary from step to step) and a plain step ``plain_rate``;
    return the share of tree steps and the tokens per second the steps gave."""
    draw = random.Random(seed)
    trees, tokens, seconds = 0, 0, 0.0
    for _ in range(steps):
        speculate = policy.choose(batch_size)
        if speculate:
            trees += 1
            emitted = batch_size * draw.randint(1, 5)  # 3 a row on average
            took = emitted / tree_rate * (3 * batch_size) / emitted  # a step's time does not depend on acceptance
        else:
            emitted, took = batch_size, batch_size / plain_rate
        policy.record(batch_size, speculate, emitted, took)
        tokens, seconds = tokens + emitted, seconds + took
    return trees / steps, tokens / seconds


def test_a_fixed_threshold_never_measures():
    policy = SpeculationPolicy(prior=2, adaptive=False)
    assert [policy.choose(b) for b in (1, 2, 3, 8)] == [True, True, False, False]
    share, _ = serve(policy, 1, 100, tree_rate=10.0, plain_rate=50.0)
    assert share == 1.0 and policy.seconds == {} and policy.table() == {}


@pytest.mark.parametrize(
    "batch_size,tree_rate,plain_rate",
    [(1, 60.0, 33.0), (2, 70.0, 90.0), (4, 60.0, 100.0), (6, 160.0, 120.0)],  # the prior is wrong at 2 and 6
)
def test_measured_choice_settles_on_the_faster_kind(batch_size, tree_rate, plain_rate):
    policy = SpeculationPolicy(prior=2)
    share, rate = serve(policy, batch_size, 1000, tree_rate, plain_rate)
    faster_is_tree = tree_rate > plain_rate
    assert (share > 0.9) if faster_is_tree else (share < 0.1), share
    assert rate > 0.93 * max(tree_rate, plain_rate)  # warm-up and exploration cost little
    measured = policy.table()[str(batch_size)]
    assert measured["tree_steps"] > 0 and measured["plain_steps"] > 0  # both kinds kept measured


def test_the_choice_follows_a_change_of_load():
    """What was true at a batch size can change (longer contexts, other prompts): exploration sees it."""
    policy = SpeculationPolicy(prior=2)
    share, _ = serve(policy, 3, 500, tree_rate=120.0, plain_rate=80.0)
    assert share > 0.9
    share, _ = serve(policy, 3, 500, tree_rate=60.0, plain_rate=80.0, seed=1)
    assert share < 0.2


def test_exploring_a_clear_loser_is_rarer():
    close, far = SpeculationPolicy(prior=1), SpeculationPolicy(prior=1)  # (close ones may flip: both are fine)
    serve(close, 1, 640, tree_rate=90.0, plain_rate=80.0)  # within the margin: every 16th step explores
    serve(far, 1, 640, tree_rate=160.0, plain_rate=80.0)  # 2x apart: every 64th
    assert close.table()["1"]["plain_steps"] >= 40 and far.table()["1"]["plain_steps"] == 11


def test_one_slow_step_does_not_turn_the_choice():
    """A step slowed by something else on the machine (a 20x outlier) would hold a mean of step times
    up for as long as only exploration refreshes it; the median ignores it."""
    policy = SpeculationPolicy(prior=2)
    serve(policy, 1, 100, tree_rate=60.0, plain_rate=30.0)
    policy.record(1, True, 3, 20 * 3 / 60.0)  # one tree step 20 times slower than usual
    share, _ = serve(policy, 1, 300, tree_rate=60.0, plain_rate=30.0, seed=2)
    assert share > 0.95
