"""Decode steps of w4a8 targets, a layer a call (redrafter.fused_layer, kernels/layer.c)."""

from __future__ import annotations

import pytest
import torch
from conftest import COMMON, VOCAB, tiny_target
from test_parity import random_prompt, speculative
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from redrafter.decode import DrafterProposer, SpeculativeDecoder, no_draft
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import LeanDecoder
from redrafter.models import attention_windows
from redrafter.quant import quantization_refusal, quantize_target
from redrafter.tree import additive_mask, layer_masks

pytestmark = pytest.mark.skipif(
    quantization_refusal("cpu", torch.bfloat16, "w4a8") is not None,
    reason=str(quantization_refusal("cpu", torch.bfloat16, "w4a8")),
)

# Sizes the fused layer takes (heads of 32): two query heads per key/value head.
WIDE = COMMON | dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
FUSABLE = {
    "llama": lambda: LlamaConfig(**WIDE),
    "qwen2": lambda: Qwen2Config(**WIDE),  # biases on the query, key and value projections
    "mistral": lambda: MistralConfig(**WIDE, sliding_window=6),  # a window shorter than the prompts
    # ten query heads on one key/value head: attention_group takes them eight at a time
    "llama-10-heads": lambda: LlamaConfig(**WIDE | dict(hidden_size=320, num_attention_heads=10)),
}


def w4a8_target(family: str, dtype: torch.dtype, seed: int = 0):
    model = tiny_target(family, seed=seed, dtype=dtype, config=FUSABLE[family]())
    assert quantize_target(model, "w4a8").from_weights == 7 * model.config.num_hidden_layers
    return model


def prefilled(lean: LeanDecoder, prompt: list[int], dtype: torch.dtype, invariant: bool = False) -> TreeKVCache:
    """A cache holding ``prompt``, prefilled as the decode loop does (``invariant``: by the unfused
    layers with the attention of decode steps, the arithmetic of a fused prefill)."""
    cache = TreeKVCache(len(lean.layers), capacity=8)  # small: the steps grow it
    n = len(prompt)
    causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), dtype)
    if invariant:
        lean.make_tables(n, torch.device("cpu"))
        lean.run(torch.tensor([prompt]), torch.arange(n)[None], causal, cache, invariant=True)
    else:
        lean(torch.tensor([prompt]), torch.arange(n)[None], causal, cache)
    return cache


def chain_step(
    lean: LeanDecoder, cache: TreeKVCache, tokens: list[int], dtype: torch.dtype, layers: tuple[int, ...] = ()
) -> torch.Tensor:
    """``tokens`` as one causal chain after what ``cache`` holds: ``[1, q, (1 + n) d]``, the final hidden
    states, then the outputs of decoder layers ``layers``."""
    start, q = cache.length, len(tokens)
    allowed = torch.cat([torch.ones(q, start, dtype=torch.bool), torch.ones(q, q, dtype=torch.bool).tril()], 1)
    positions = torch.arange(start, start + q)[None]
    return lean(torch.tensor([tokens]), positions, additive_mask(allowed[None], dtype), cache, layers)


@pytest.mark.parametrize("family", sorted(FUSABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_step_computes_what_the_unfused_one_does(family, dtype):
    """The same layers, rounded at the same places: equal up to the last bit of a norm or a SiLU; the
    first layer's output too (a drafter that reads it: captured after that layer, not at the end). The
    prompt's prefill too: fused against the unfused layers with decode steps' attention."""
    model = w4a8_target(family, dtype)
    with torch.inference_mode():
        lean = LeanDecoder(model)
        fused = lean.fused
        assert fused is not None
        prompt, tokens = random_prompt(11, 1), random_prompt(5, 2)
        results = {}
        for name in ("fused", "unfused"):
            lean.fused = fused if name == "fused" else None
            cache = prefilled(lean, prompt, dtype, invariant=name == "unfused")
            hidden = chain_step(lean, cache, tokens, dtype, layers=(0,))
            results[name] = hidden, cache.layers[1].keys[:, :, : cache.length].clone(), cache.length
    (hidden, keys, length), (expected, expected_keys, expected_length) = results["fused"], results["unfused"]
    assert length == expected_length == 16
    final, first = expected.chunk(2, dim=-1)
    assert not torch.allclose(final, first, rtol=0.1)  # the first layer's output is not the final state
    scale = float(expected.abs().max())
    tolerance = 1e-5 if dtype == torch.float32 else 2**-6  # bfloat16: a last-bit difference carried on
    assert float((hidden - expected).abs().max()) <= tolerance * scale
    assert float((keys - expected_keys).abs().max()) <= tolerance * float(expected_keys.abs().max())
    if dtype == torch.bfloat16:  # most values agree bit for bit
        assert (hidden == expected).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_runs_the_fused_layers_in_parts_of_at_most_fused_part_tokens(dtype, monkeypatch):
    """A w4a8 prompt is prefilled by the fused layers, in calls of at most FUSED_PART_TOKENS tokens: the
    same bits in one call or in parts (and in the layers captured for a drafter); what the unfused layers
    give with decode steps' attention, up to the last bits of a norm or a SiLU, and not SDPA's bits."""
    from redrafter import lean_decoder

    model = w4a8_target("mistral", dtype, seed=3)  # a sliding window: a mask per layer type
    prompt = random_prompt(12, 5) * 2
    n = len(prompt)
    with torch.inference_mode():
        lean = LeanDecoder(model)
        fused = lean.fused
        calls, call = [], type(fused).__call__
        record = lambda self, x, *args, **kwargs: calls.append(x.shape[1]) or call(self, x, *args, **kwargs)  # noqa: E731
        monkeypatch.setattr(type(fused), "__call__", record)
        positions = torch.arange(n)[None]
        allowed = torch.ones(1, n, n, dtype=torch.bool).tril()
        mask = layer_masks(allowed, positions, positions, attention_windows(model.config), dtype)
        assert mask.shape == (1, 1, n, n) and not torch.equal(mask, additive_mask(allowed, dtype))
        results = {}
        for name, part in (("whole", 64), ("parts", 10), ("sdpa", 64), ("invariant", 64)):
            monkeypatch.setattr(lean_decoder, "FUSED_PART_TOKENS", part)
            lean.fused = None if name in ("sdpa", "invariant") else fused
            calls.clear()
            cache = TreeKVCache(len(lean.layers), capacity=8)
            if name == "invariant":  # the unfused layers with decode steps' attention
                lean.make_tables(n, torch.device("cpu"))
                hidden = lean.run(torch.tensor([prompt]), positions, mask, cache, layers=(0,), invariant=True)
            else:
                hidden = lean(torch.tensor([prompt]), positions, mask, cache, layers=(0,))
            results[name] = hidden, cache.layers[-1].keys[:, :, :n].clone(), list(calls)
    (whole, keys, whole_calls), (parts, parts_keys, parts_calls) = results["whole"], results["parts"]
    (_, sdpa_keys, _), (_, invariant_keys, _) = results["sdpa"], results["invariant"]
    assert (whole_calls, parts_calls) == ([24], [10, 10, 4])
    assert torch.equal(whole, parts) and torch.equal(keys, parts_keys)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-6
    assert float((keys - invariant_keys).abs().max()) <= tolerance * float(invariant_keys.abs().max())
    assert not torch.equal(keys, sdpa_keys)  # another attention's sums: a different prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_prefilled_whole_or_in_two_parts_leaves_the_same_bits(dtype):
    """A fused prefill sums as decode steps do, so a prompt gives the same cache and last hidden state
    prefilled at once or as a prefill and a chain after it (as a server could split it)."""
    model = w4a8_target("llama", dtype, seed=4)
    prompt = random_prompt(10, 6) + random_prompt(9, 7)
    with torch.inference_mode():
        lean = LeanDecoder(model)
        n = len(prompt)
        whole = TreeKVCache(len(lean.layers), capacity=8)
        causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), dtype)
        last = lean(torch.tensor([prompt]), torch.arange(n)[None], causal, whole)[:, -1]
        parts = prefilled(lean, prompt[:7], dtype)
        last_of_parts = chain_step(lean, parts, prompt[7:], dtype)[:, -1]
    assert torch.equal(last, last_of_parts)
    for a, b in zip(whole.layers, parts.layers, strict=True):
        assert torch.equal(a.keys[:, :, :n], b.keys[:, :, :n]) and torch.equal(a.values[:, :, :n], b.values[:, :, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("part", [1024, 5])
def test_a_prompt_prefilled_alone_or_left_padded_in_a_batch_leaves_the_same_bits(dtype, part, monkeypatch):
    """The fused prefill skips masked keys, so a row's cache and last hidden state do not depend on the
    longer prompts it was prefilled beside (what a server's batched admission relies on); also when
    the prefill runs in parts (of 5 tokens: the short row's first part is all padding)."""
    from redrafter import lean_decoder

    monkeypatch.setattr(lean_decoder, "FUSED_PART_TOKENS", part)
    model = w4a8_target("qwen2", dtype, seed=5)
    decoder = SpeculativeDecoder(model, no_draft, [])
    # left-padded by 18 beside 53 tokens, other keys than alone fall in runs of sixteen (scored together)
    short, longer = random_prompt(35, 8), random_prompt(53, 9)
    with torch.inference_mode():
        alone, hidden_alone, _ = decoder._prefill([short], 4)
        batch, hidden_batch, valid = decoder._prefill([longer, short], 4)
    assert not valid[1, : len(longer) - len(short)].any()  # the short row is left-padded
    assert torch.equal(hidden_batch[1], hidden_alone[0])
    pad = len(longer) - len(short)
    for a, b in zip(alone.layers, batch.layers, strict=True):
        assert torch.equal(b.keys[1, :, pad : len(longer)], a.keys[0, :, : len(short)])
        assert torch.equal(b.values[1, :, pad : len(longer)], a.values[0, :, : len(short)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_gets_the_same_bits_in_a_chain_and_alone(dtype):
    """Batch invariance: a chain of tokens as one fused forward equals the same tokens one at a time,
    bit for bit, and so do the cache entries they leave."""
    model = w4a8_target("llama", dtype, seed=1)
    with torch.inference_mode():
        lean = LeanDecoder(model)
        prompt, tokens = random_prompt(9, 3), random_prompt(6, 4)
        cache = prefilled(lean, prompt, dtype)
        chain = chain_step(lean, cache, tokens, dtype)
        chain_keys = cache.layers[0].keys[:, :, : cache.length].clone()
        cache = prefilled(lean, prompt, dtype)
        alone = torch.cat([chain_step(lean, cache, [token], dtype) for token in tokens], dim=1)
        assert torch.equal(chain, alone)
        assert torch.equal(chain_keys, cache.layers[0].keys[:, :, : cache.length])


@pytest.mark.parametrize("family", sorted(FUSABLE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_speculative_decoding_through_fused_layers_equals_plain_decoding(family, dtype):
    """Greedy ``redrafter`` on fused steps (a batch of mixed lengths: padded rows, trees, lookup) equals
    plain greedy decoding token for token, in bfloat16 too."""
    model = w4a8_target(family, dtype, seed=2)
    torch.manual_seed(5)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=model.config.hidden_size, vocab_size=VOCAB)).to(dtype)
    drafter.attach(model.get_input_embeddings()).eval()
    plain = SpeculativeDecoder(model, no_draft, [])
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4, tree_nodes=6), [], lookup_len=6)
    assert getattr(decoder.forward, "lean", decoder.forward).fused is not None
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (1, 6, 15)]
    ids, _ = speculative(decoder, prompts, 30)
    assert ids == speculative(plain, prompts, 30)[0]
    accepted, per_step = speculative(decoder, prompts[2:], 30)
    assert max(per_step) > 1  # drafts were accepted: trees went through the fused layers


def test_where_the_fused_layer_does_not_apply_the_unfused_forward_runs():
    narrow = tiny_target("llama", dtype=torch.float32)  # heads of 8
    quantize_target(narrow, "w4a8")
    assert LeanDecoder(narrow).fused is None
    int4 = tiny_target("llama", dtype=torch.float32, config=FUSABLE["llama"]())
    quantize_target(int4, "int4")
    assert LeanDecoder(int4).fused is None
    assert LeanDecoder(tiny_target("llama", dtype=torch.float32, config=FUSABLE["llama"]())).fused is None
