"""Continuous batching: rows join a running batch between steps and leave when done or cancelled;
each row's output is what it would be alone (greedy: exactly ``model.generate``'s, float64)."""

from __future__ import annotations

import pytest
from conftest import tiny_target
from test_parity import hf_greedy, random_drafter, random_prompt

from redrafter.decode import PREFILL_FORWARD_ROWS, DrafterProposer, RunningBatch, SpeculativeDecoder, prefill_groups
from redrafter.sampling import RowChooser, SamplingParams, TokenChooser


def drive(
    batch: RunningBatch,
    joins: dict[int, list[tuple[list[int], int]]],
    outputs: dict[int, list[int]],
    kinds: list[int] = [1],  # noqa: B006 (read only)
) -> None:
    """Step ``batch`` until it is empty, adding ``joins[k]`` (prompt, budget) pairs before step ``k``;
    step ``k`` is of kind ``kinds[k % len(kinds)]`` (see :meth:`RunningBatch.step`)."""
    step = 0
    while batch.size or any(k >= step for k in joins):
        if step in joins:
            prompts, budgets = zip(*joins[step], strict=True)
            out = batch.add(list(prompts), list(budgets))
            for row, tokens in zip(out.rows, out.tokens, strict=True):
                outputs.setdefault(row, []).extend(tokens)
        out = batch.step(kinds[step % len(kinds)])
        for row, tokens in zip(out.rows, out.tokens, strict=True):
            outputs[row].extend(tokens)
        step += 1


@pytest.mark.parametrize("family_name", ["llama", "gemma3"])
@pytest.mark.parametrize("lookup_len", [0, 6])
def test_rows_that_join_a_running_batch_decode_as_alone(family_name, lookup_len):
    model = tiny_target(family_name, seed=11)
    decoder = SpeculativeDecoder(
        model, DrafterProposer(random_drafter(model, seed=11), 3, 4, tree_nodes=6), [], lookup_len
    )
    prompts = [random_prompt(n, 20 + n) for n in (7, 2, 19, 4, 11)]
    joins = {
        0: [(prompts[0], 30)],
        2: [(prompts[1], 12), (prompts[2], 25)],
        5: [(prompts[3], 30)],
        9: [(prompts[4], 8)],
    }
    outputs: dict[int, list[int]] = {}
    drive(RunningBatch(decoder, TokenChooser(model, SamplingParams())), joins, outputs)
    budgets = [30, 12, 25, 30, 8]
    assert sorted(outputs) == [0, 1, 2, 3, 4]  # ids in the order rows joined
    for row, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        assert outputs[row] == hf_greedy(model, prompt, budget), f"row {row}"


def test_a_cancelled_row_leaves_at_once_and_the_others_go_on():
    model = tiny_target("llama", seed=12)
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=12), 2, 3), [])
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    prompts = [random_prompt(5, 1), random_prompt(9, 2), random_prompt(3, 3)]
    outputs: dict[int, list[int]] = {}
    for out in (batch.add(prompts, [20, 20, 20]), batch.step()):
        for row, tokens in zip(out.rows, out.tokens, strict=True):
            outputs.setdefault(row, []).extend(tokens)
    batch.cancel(1)
    assert batch.size == 2 and batch.rows.ids == [0, 2]
    while batch.size:
        out = batch.step()
        assert 1 not in out.rows
        for row, tokens in zip(out.rows, out.tokens, strict=True):
            outputs[row].extend(tokens)
    assert outputs[0] == hf_greedy(model, prompts[0], 20) and outputs[2] == hf_greedy(model, prompts[2], 20)
    assert outputs[1] == hf_greedy(model, prompts[1], 20)[: len(outputs[1])]
    assert batch.step().rows == [] and batch.budget == {}


def test_per_row_sampling_beside_other_rows_is_what_the_row_draws_alone():
    """A seeded sampled row draws for its own tree slots only: beside greedy and other sampled rows
    it emits exactly what it emits alone; the greedy rows stay ``model.generate``'s."""
    model = tiny_target("llama", seed=13)
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=13), 3, 4), [], lookup_len=5)
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=7)

    def run(rows: list[tuple[list[int], SamplingParams]]) -> dict[int, list[int]]:
        chooser = RowChooser(model)
        batch = RunningBatch(decoder, chooser)
        for row, (_, params) in enumerate(rows):
            chooser.add(row, params)
        outputs: dict[int, list[int]] = {}
        joins = {2 * k: [(prompt, 20)] for k, (prompt, _) in enumerate(rows)}
        drive(batch, joins, outputs)
        return outputs

    greedy = SamplingParams()
    target = random_prompt(6, 5)
    alone = run([(target, sampled)])[0]
    mixed = run([(random_prompt(4, 6), greedy), (target, sampled), (random_prompt(8, 7), SamplingParams(1.3, seed=2))])
    assert mixed[1] == alone
    assert mixed[0] == hf_greedy(model, random_prompt(4, 6), 20)


@pytest.mark.parametrize("kinds", [[1], [0]])
def test_a_batch_drops_the_padding_its_rows_no_longer_need(kinds):
    """When the row that set the shared cache length leaves, the others' entries move together and
    the cache shrinks to the longest remaining row; what they decode does not change."""
    model = tiny_target("llama", seed=13)
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=13), 3, 4), [], lookup_len=5)
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    prompts = [random_prompt(60, 31), random_prompt(4, 32), random_prompt(9, 33)]
    outputs: dict[int, list[int]] = {}
    lengths = []  # (shared cache length, longest row's real entries) after each step
    for step in range(40):
        if step in (0, 3):
            joining = [prompts[0], prompts[1]] if step == 0 else [prompts[2]]
            out = batch.add(joining, [6, 30] if step == 0 else [25])
            for row, tokens in zip(out.rows, out.tokens, strict=True):
                outputs.setdefault(row, []).extend(tokens)
        if not batch.size:
            break
        out = batch.step(kinds[step % len(kinds)])
        for row, tokens in zip(out.rows, out.tokens, strict=True):
            outputs[row].extend(tokens)
        if batch.size:
            lengths.append((batch.rows.cache.length, int(batch.rows.row_length.max())))
    for row, (prompt, budget) in enumerate(zip(prompts, [6, 30, 25], strict=True)):
        assert outputs[row] == hf_greedy(model, prompt, budget), f"row {row}"
    # Row 0 (60 prompt tokens) left after its 6 tokens; the cache then holds what the others need.
    assert lengths[0][0] >= 60
    assert all(shared - longest < max(16, shared / 4) for shared, longest in lengths)
    assert lengths[-1][0] < 60


def test_prompts_that_join_together_are_prefilled_in_groups_of_similar_length():
    """The fewest rows computed, counting PREFILL_FORWARD_ROWS per forward: prompts of close lengths
    share a forward, far ones do not; every prompt is in exactly one group; on a GPU one group."""
    assert PREFILL_FORWARD_ROWS == 64
    assert prefill_groups([6, 7]) == [[0, 1]] and prefill_groups([100] * 16) == [list(range(16))]
    lengths = [402, 50, 60, 100, 120, 30, 35, 200]
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert groups == [[5, 6, 1, 2], [3, 4], [7], [0]]  # 4 forwards: 4 * 64 + 240 + 240 + 200 + 402 rows

    def rows(split):
        return sum(PREFILL_FORWARD_ROWS + len(g) * max(lengths[i] for i in g) for g in split)

    assert rows(groups) == 1338 < rows([list(range(8))]) == 64 + 8 * 402  # one forward: 3,280 rows
    assert rows(groups) < rows([[5, 6, 1, 2, 3, 4], [7], [0]])  # merging the first two groups: 1,514
    assert prefill_groups(lengths, "cuda") == [list(range(8))] and prefill_groups([5]) == [[0]]


def test_rows_prefilled_in_separate_groups_decode_as_alone():
    """A short and a long prompt joining together take two prefill forwards; each row's greedy output
    is still transformers' (float64), and the rows keep the order of the prompts."""
    model = tiny_target("llama", seed=13)
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=13), 2, 3), [], lookup_len=4)
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    prompts = [random_prompt(150, 4), random_prompt(3, 5), random_prompt(140, 6)]
    assert prefill_groups([len(p) for p in prompts]) == [[1], [2, 0]]
    outputs: dict[int, list[int]] = {}
    drive(batch, {0: [(prompt, 16) for prompt in prompts]}, outputs)
    for row, prompt in enumerate(prompts):
        assert outputs[row] == hf_greedy(model, prompt, 16), row
    batch = RunningBatch(decoder, TokenChooser(model, SamplingParams()))
    assert batch.add(prompts, [4, 4, 4]).rows == [0, 1, 2] and batch.rows.ids == [0, 1, 2]
