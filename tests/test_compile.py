"""The compiled forward (``--compile``): the lean forward through ``torch.compile``, same outputs.

Each test compiles a tiny float64 model (tens of seconds on a 2-core CPU), and checks that dynamo
really compiled graphs, so a silent fall-back to the eager forward would fail it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import COMMON, tiny_target
from test_batching import drive
from test_lean_decoder import a_tree, forward_twice
from test_parity import hf_greedy, random_drafter, random_prompt, speculative
from torch._dynamo.utils import counters
from transformers import LlamaConfig

from redrafter.api import ReDrafter
from redrafter.bench import parse_variant
from redrafter.decode import DrafterProposer, RunningBatch, SpeculativeDecoder, TreeKind, no_draft
from redrafter.errors import RedrafterError
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import (
    INT4_ROW_BUCKETS,
    CompiledDecoder,
    LeanDecoder,
    compile_refusal,
    target_forward,
)
from redrafter.models import attention_windows
from redrafter.quant import quantize_target
from redrafter.sampling import SamplingParams, TokenChooser
from redrafter.tree import layer_masks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Forget graphs compiled by earlier tests: same-shaped models share them."""
    torch._dynamo.reset()


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_forward_equals_the_lean_one_in_float64():
    model = tiny_target("qwen2")  # biases too
    tree, ancestors = a_tree(2)
    compiled = target_forward(model, compile=True)
    assert isinstance(compiled, CompiledDecoder) and compiled.lean is target_forward(model)
    # Prompts of 11 tokens, then of 13: the second's tree no longer fits the cache (room for 17),
    # which grows before the compiled forward, not inside it (in a graph of its own); then of 12:
    # the tree would fill the cache exactly (a view of the whole buffer, a graph of its own).
    for length, seed in ((11, 3), (13, 4), (12, 6)):
        prompt = torch.randint(1, COMMON["vocab_size"], (2, length), generator=torch.Generator().manual_seed(seed))
        expected = forward_twice(model, LeanDecoder(model), prompt, tree, ancestors, capacity=17)
        before = compiled_graphs()
        got = forward_twice(model, compiled, prompt, tree, ancestors, capacity=17)
        assert compiled_graphs() > before if length == 11 else compiled_graphs() == before
        # The model's float32 parts (its rotary tables, its norms, float32 even for a float64 model)
        # run in generated kernels instead of aten's: they round differently, at float32's precision.
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    # A cache longer than the rotary tables at low positions (in a continuous batch the shared cache
    # outgrows the tables, rows joining left-padded to it): the tables stay, nothing compiles.
    tables = compiled.lean.cos
    before = compiled_graphs()
    expected = long_cache_low_positions(model, LeanDecoder(model), tables.shape[0] + 70)
    got = long_cache_low_positions(model, compiled, tables.shape[0] + 70)
    assert compiled.lean.cos is tables and compiled_graphs() == before
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def long_cache_low_positions(model, forward, length: int) -> torch.Tensor:
    """Prefill ``length`` tokens at positions below 100 (two rows), then verify a tree after them;
    the tree's hidden states."""
    windows = attention_windows(model.config)
    cache = TreeKVCache(model.config.num_hidden_layers, capacity=length + 8)
    prompt = torch.randint(1, COMMON["vocab_size"], (2, length), generator=torch.Generator().manual_seed(5))
    positions = (torch.arange(length) % 100)[None].expand(2, -1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    forward(prompt, positions, layer_masks(causal, positions, positions, windows, model.dtype), cache)
    tree, ancestors = a_tree(2)
    tree_positions = 100 + ancestors.sum(-1) - 1
    allowed = torch.cat([torch.ones(2, 5, length, dtype=torch.bool), ancestors], dim=2)
    key_positions = torch.cat([positions, tree_positions], dim=1)
    return forward(
        tree, tree_positions, layer_masks(allowed, tree_positions, key_positions, windows, model.dtype), cache
    )


@pytest.fixture
def restarts():
    """Dynamo's messages of tracing a graph again from the start (each costs a whole trace)."""
    messages: list[str] = []

    class Restarts(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Restarting analysis"):
                messages.append(record.getMessage())

    logger, handler = logging.getLogger("torch._dynamo.convert_frame"), Restarts()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_compiled_speculative_greedy_equals_plain_greedy(restarts):
    model = tiny_target("llama", seed=5)
    drafter = random_drafter(model, seed=11)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4), eos_token_ids=[], lookup_len=5, compile=True)
    before = compiled_graphs()
    prompts = [random_prompt(length, seed) for seed, length in enumerate((6, 13, 3))]
    ids, _ = speculative(decoder, prompts, 24)  # a batch of three rows of different lengths
    assert compiled_graphs() > before
    for prompt, got in zip(prompts, ids, strict=True):
        assert got == hf_greedy(model, prompt, 24)
    one, _ = speculative(decoder, [prompts[1]], 30)  # one row, longer: the same graphs, other sizes
    assert one[0] == hf_greedy(model, prompts[1], 30)
    assert not restarts  # the model's float constants are not traced as symbols (CompiledDecoder.forward)


def test_compile_needs_the_lean_forward():
    gemma = tiny_target("gemma3")
    assert "gemma3_text" in compile_refusal(gemma)
    with pytest.raises(ValueError, match="needs the lean one"):
        target_forward(gemma, compile=True)
    with pytest.raises(RedrafterError, match="--compile: .*gemma3_text"):
        ReDrafter(gemma, None, None, compile=True)
    llama = tiny_target("llama")
    assert compile_refusal(llama) is None and "lean=False" in compile_refusal(llama, lean=False)
    with pytest.raises(RedrafterError, match="lean=False"):
        ReDrafter(llama, None, None, lean=False, compile=True)


def test_a_bench_variant_can_compile():
    assert parse_variant("c", "compile=1,beams=2") == {"compile": 1, "num_beams": 2}


def test_a_warmed_up_decoder_compiles_nothing_while_rows_join_and_steps_change_kind():
    """Rows join and leave between steps (the server's batch), and steps change kind (tree, small
    tree, plain): after :meth:`SpeculativeDecoder.warm_up` no new shape, stride or kind compiles
    anything, and the outputs stay exact."""
    model = tiny_target("llama", seed=11)
    drafter = random_drafter(model, seed=11)
    small = TreeKind(DrafterProposer(drafter, 2, 2), lookup_len=3)
    decoder = SpeculativeDecoder(
        model, DrafterProposer(drafter, 3, 4, tree_nodes=6), [], 6, small_tree=small, compile=True
    )
    before = compiled_graphs()
    decoder.warm_up()
    warmed = compiled_graphs()
    # The prefill, the plain step and the trees' steps, each for one row and for more.
    assert 4 <= warmed - before <= 6
    prompts = [random_prompt(n, 20 + n) for n in (7, 2, 19, 4, 11, 5, 6)]
    budgets = [30, 12, 25, 30, 8, 9, 10]
    joins = {0: [0], 2: [1, 2], 5: [3], 9: [4], 12: [5, 6]}
    joins = {step: [(prompts[i], budgets[i]) for i in rows] for step, rows in joins.items()}
    outputs: dict[int, list[int]] = {}
    drive(RunningBatch(decoder, TokenChooser(model, SamplingParams())), joins, outputs, kinds=[1, 0, 2, 2, 0])
    assert compiled_graphs() == warmed
    for row, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        assert outputs[row] == hf_greedy(model, prompt, budget), f"row {row}"


AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.mark.skipif(not AVX512, reason="Inductor offers its int4 templates on AVX-512 CPUs only")
def test_compiled_int4_products_are_autotuned_and_agree_with_the_eager_forward():
    """With int4 weights a step's products get a bucket's row count, and Inductor chooses between
    aten's int4 kernel and its own template by timing both (it times nothing when the template is
    not offered: one choice). The template takes bfloat16 inputs and layers of multiples of 64
    outputs, hence a wider tiny model. The hidden states agree with the eager forward's to bfloat16
    rounding: within a few bfloat16 steps of the largest value."""
    config = LlamaConfig(**(COMMON | {"hidden_size": 64, "intermediate_size": 128}))
    model = tiny_target("llama", seed=3, dtype=torch.bfloat16, config=config)
    quantize_target(model, "int4")
    compiled = target_forward(model, compile=True)
    assert compiled.row_buckets == INT4_ROW_BUCKETS
    prompt = torch.randint(1, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    tree, ancestors = a_tree(2)  # 2 x 5 rows: padded to 16
    timed = counters["inductor"]["select_algorithm_autotune"]
    with inductor_config.patch(force_disable_caches=True):  # a choice cached on disk is not timed again
        got = forward_twice(model, compiled, prompt, tree, ancestors, capacity=32)
    assert counters["inductor"]["select_algorithm_autotune"] > timed
    expected = forward_twice(model, LeanDecoder(model), prompt, tree, ancestors, capacity=32)
    for want, have in zip(expected, got, strict=True):
        # Other kernels, other roundings: a few bfloat16 steps (one is 1/128 of a value) at most.
        scale = want.float().abs().max().item()
        torch.testing.assert_close(have.float(), want.float(), rtol=0, atol=scale / 32)


@pytest.mark.skipif(not AVX512, reason="Inductor offers its int4 templates on AVX-512 CPUs only")
def test_a_warmed_up_int4_decoder_compiles_no_bucket_while_rows_join():
    """Autotuned int4 products make a step graph per bucket of rows; the warm-up compiles each for
    up to ``max_rows`` rows (two buckets here, so that the test compiles few graphs): then rows of
    every count join and leave, trees and plain steps alternate, and nothing compiles."""
    model = tiny_target("llama", seed=11, dtype=torch.float32)
    quantize_target(model, "int4")
    drafter = random_drafter(model, seed=11).float()
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 2, 3), [], 4, compile=True)
    compiled = decoder.forward
    compiled.row_buckets = (1, 4)
    # Which graphs there are is dynamo's guards' doing, whatever compiles them: skip Inductor's minutes.
    compiled.compiled = torch.compile(compiled.lean.run, dynamic=True, backend="eager")
    before = compiled_graphs()
    decoder.warm_up(max_rows=5)
    warmed = compiled_graphs()
    assert warmed > before
    prompts = [random_prompt(n, 40 + n) for n in (7, 2, 19, 4, 11)]
    budgets = [20, 12, 16, 20, 8]
    joins = {0: [0], 2: [1, 2], 5: [3, 4]}
    joins = {step: [(prompts[i], budgets[i]) for i in rows] for step, rows in joins.items()}
    outputs: dict[int, list[int]] = {}
    drive(RunningBatch(decoder, TokenChooser(model, SamplingParams())), joins, outputs, kinds=[1, 0, 1, 0, 0])
    assert compiled_graphs() == warmed
    # The eager backend runs aten's kernels: the same as the eager decoder's, row for row.
    plain = SpeculativeDecoder(model, no_draft, [])
    for row, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        expected, _ = speculative(plain, [prompt], budget)
        assert outputs[row] == expected[0], f"row {row}"
