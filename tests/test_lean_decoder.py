"""The lean forward runs the same model as transformers' decoder, with the weights it already has."""

from __future__ import annotations

import pytest
import torch
from conftest import COMMON, random_linear, tiny_target
from test_parity import WINDOWED
from transformers import LlamaConfig

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import (
    SUPPORTED_MODEL_TYPES,
    LeanDecoder,
    PackedForward,
    PackedProducts,
    SideBySide,
    forward_head,
    fuse_linears,
    lean_support,
    packed_refusal,
    target_forward,
    transformers_forward,
)
from redrafter.models import attention_windows, hidden_to_logits
from redrafter.quant import (
    FLOAT32_PACKED_MIN_ROWS,
    PACKED_MAX_ROWS,
    Float32GemmLinear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    packs_linears,
    quantize_int4,
)
from redrafter.tree import layer_masks


def forward_twice(model, forward, prompt: torch.Tensor, tree: torch.Tensor, ancestors: torch.Tensor, capacity: int = 8):
    """Prefill ``prompt [B, P]`` then verify ``tree [B, N]`` (a tree mask) through ``forward``; both
    hidden-state tensors. The cache starts with room for ``capacity`` entries (by default fewer
    than a prompt: it grows on the way)."""
    batch, length = prompt.shape
    windows = attention_windows(model.config)
    cache = TreeKVCache(model.config.num_hidden_layers, capacity=capacity)
    positions = torch.arange(length)[None].expand(batch, -1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None].expand(batch, -1, -1)
    masks = layer_masks(causal, positions, positions, windows, model.dtype)
    first = forward(prompt, positions, masks, cache)
    slots = tree.shape[1]
    depth = ancestors.sum(-1) - 1
    tree_positions = length + depth
    allowed = torch.cat([torch.ones(batch, slots, length, dtype=torch.bool), ancestors], dim=2)
    key_positions = torch.cat([positions, tree_positions], dim=1)
    masks = layer_masks(allowed, tree_positions, key_positions, windows, model.dtype)
    second = forward(tree, tree_positions, masks, cache)
    return first, second


def a_tree(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, 5]`` and ancestors ``[B, 5, 5]`` of a tree: 0 -> 1 -> 2, 0 -> 3 -> 4."""
    parents = [-1, 0, 1, 0, 3]
    ancestors = torch.eye(5, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            ancestors[node] |= ancestors[parent]
    tokens = torch.randint(1, COMMON["vocab_size"], (batch, 5), generator=torch.Generator().manual_seed(7))
    return tokens, ancestors[None].expand(batch, -1, -1)


CONFIGS = {name: lambda name=name: tiny_target(name) for name in SUPPORTED_MODEL_TYPES} | {
    f"windowed-{name}": lambda name=name: tiny_target(name, config=WINDOWED[name]()) for name in ("mistral", "qwen2")
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lean_forward_equals_transformers_in_float64(name):
    model = CONFIGS[name]()
    prompt = torch.randint(1, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    tree, ancestors = a_tree(2)
    expected = forward_twice(model, transformers_forward(model), prompt, tree, ancestors)
    lean = LeanDecoder(model)
    got = forward_twice(model, lean, prompt, tree, ancestors)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-12)
    # The model's own modules now hold views of the fused weights and still give the same outputs.
    attention = model.model.layers[0].self_attn
    fused = lean.layers[0].qkv.weight
    assert attention.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    again = forward_twice(model, transformers_forward(model), prompt, tree, ancestors)
    for want, have in zip(expected, again, strict=True):
        assert torch.equal(have, want)


def test_qwen2_biases_are_fused():
    model = tiny_target("qwen2")
    attention = model.model.layers[1].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    x = torch.randn(3, COMMON["hidden_size"], dtype=torch.float64)
    parts = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    fused = LeanDecoder(model).layers[1].qkv(x)
    torch.testing.assert_close(fused, torch.cat(parts, dim=-1), rtol=0, atol=1e-12)


def test_int4_and_int8_layers_fuse_bitwise():
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, 96, generator=generator) for rows in (128, 64, 64)]
    x = torch.randn(5, 96, generator=generator, dtype=torch.float32)
    int4 = [Int4Linear(quantize_int4(w), None, torch.float32) for w in weights]
    int8 = [Int8Linear(w, torch.randn(w.shape[0], generator=generator), torch.float32) for w in weights]
    for parts in (int4, int8):
        separate = torch.cat([part(x) for part in parts], dim=-1)
        fused = fuse_linears(parts)
        assert type(fused) is type(parts[0])
        assert torch.equal(fused(x), separate)
        assert torch.equal(torch.cat([part(x) for part in parts], dim=-1), separate)  # the parts still work
    # Outputs that do not fill whole packing blocks: run side by side, same result.
    small = [Int4Linear(quantize_int4(w[:16]), None, torch.float32) for w in weights]
    separate = torch.cat([part(x) for part in small], dim=-1)
    fused = fuse_linears(small)
    assert isinstance(fused, SideBySide) and torch.equal(fused(x), separate)
    with pytest.raises(ValueError, match="multiple of 64"):
        Int4Linear.fused(small)


def test_models_it_does_not_cover_run_through_transformers():
    gemma = tiny_target("gemma3")
    assert "gemma3_text" in lean_support(gemma)
    assert not isinstance(target_forward(gemma), LeanDecoder)
    dynamic = tiny_target("llama", config=LlamaConfig(**COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert "dynamic" in lean_support(dynamic)
    llama = tiny_target("llama")
    assert isinstance(target_forward(llama), LeanDecoder)
    assert target_forward(llama) is target_forward(llama)  # one per target: its fused weights are made once
    assert not isinstance(target_forward(llama, lean=False), LeanDecoder)


def test_rotary_tables_grow_past_their_first_size():
    """The first tables cover 1024 positions; a longer prompt and a tree after it extend them."""
    model = tiny_target("llama", config=LlamaConfig(**(COMMON | {"max_position_embeddings": 4096})))
    prompt = torch.randint(1, COMMON["vocab_size"], (1, 1030), generator=torch.Generator().manual_seed(4))
    tree, ancestors = a_tree(1)
    expected = forward_twice(model, transformers_forward(model), prompt, tree, ancestors)
    lean = LeanDecoder(model)
    got = forward_twice(model, lean, prompt, tree, ancestors)
    assert lean.cos.shape[0] >= 1035
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=0, atol=1e-10)


needs_packing = pytest.mark.skipif(
    not packs_linears("cpu", torch.bfloat16), reason="this CPU's oneDNN has no native bfloat16 products"
)


@needs_packing
def test_a_packed_linear_gives_its_layers_products():
    """oneDNN's product on the weight reordered once: the layer's own up to rounding (on the
    development machine bit for bit), its own product past PACKED_MAX_ROWS rows."""
    linear, generator = random_linear(96, 160, seed=0)
    packed = PackedLinear(linear)
    assert packed.linear is linear and packed.packed.is_mkldnn
    for shape in ((1, 96), (2, 3, 96), (1, 24, 96), (1, PACKED_MAX_ROWS, 96)):
        x = torch.randn(*shape, generator=generator).to(torch.bfloat16)
        got, want = packed(x), linear(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    wide = torch.randn(1, PACKED_MAX_ROWS + 1, 96, generator=generator).to(torch.bfloat16)
    assert torch.equal(packed(wide), linear(wide))
    strided = torch.randn(96, 5, generator=generator).to(torch.bfloat16).T  # not contiguous
    torch.testing.assert_close(packed(strided).float(), linear(strided).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="cannot pack"):
        PackedLinear(torch.nn.Linear(4, 4, dtype=torch.float64))


@needs_packing
def test_a_packed_lean_forward_is_the_unpacked_one_in_bfloat16():
    model = tiny_target("qwen2", dtype=torch.bfloat16)  # biases on the fused projections
    prompt = torch.randint(1, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    tree, ancestors = a_tree(2)
    lean = target_forward(model)
    assert isinstance(lean, LeanDecoder) and lean.packs() and lean.packed_layers is None
    expected = forward_twice(model, lean, prompt, tree, ancestors)
    packed = target_forward(model, packed=None)  # where it applies: here
    got = forward_twice(model, packed, prompt, tree, ancestors)
    assert isinstance(lean.packed_layers[0], PackedProducts)
    first = lean.packed_layers[0]
    assert isinstance(first.qkv, PackedLinear) and first.qkv.linear is lean.layers[0].qkv
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have.float(), want.float(), rtol=5e-2, atol=5e-2)
    assert packed_refusal(model) is None
    # The head packed once per target, with the head's own products bit for bit.
    assert isinstance(packed, PackedForward) and packed.lean is lean and target_forward(model, packed=True) is packed
    head = model.get_output_embeddings()
    assert isinstance(packed.head, PackedLinear) and packed.head.linear is head
    assert forward_head(packed) is packed.head and forward_head(lean) is None
    hidden = got[-1][..., : COMMON["hidden_size"]]
    assert torch.equal(packed.head(hidden), head(hidden))
    assert torch.equal(hidden_to_logits(model, hidden, head=packed.head), hidden_to_logits(model, hidden))


def test_a_packed_float32_copy_gives_the_layers_products():
    """A Float32GemmLinear's float32 copy reordered once: below FLOAT32_PACKED_MIN_ROWS the layer's own
    product (bfloat16 below its ``min_rows``, float32 from there), bit for bit; up to PACKED_MAX_ROWS the
    float32 product up to summation order (so within a bfloat16 rounding of it); past that the layer's
    own product, bit for bit."""
    linear, generator = random_linear(96, 160, seed=0)
    layer = Float32GemmLinear.wrap(linear, min_rows=3)
    packed = PackedLinear(layer)  # on any CPU when asked for; packable() says where a forward asks
    assert packed.linear is layer and packed.packed.is_mkldnn and packed.float32
    assert FLOAT32_PACKED_MIN_ROWS == 4 and packed.min_rows == 4
    for rows in (1, 2, 3):
        x = torch.randn(1, rows, 96, generator=generator).to(torch.bfloat16)
        assert torch.equal(packed(x), layer(x))
    assert torch.equal(packed(x[:, :2]), linear(x[:, :2]))  # the bfloat16 product below min_rows
    for shape in ((1, 4, 96), (2, 5, 96), (1, PACKED_MAX_ROWS, 96)):
        x = torch.randn(*shape, generator=generator).to(torch.bfloat16)
        got, float32 = packed(x), torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert got.dtype == torch.bfloat16 and got.shape == float32.shape
        torch.testing.assert_close(got.float(), float32, rtol=2**-8, atol=1e-5)
    wide = torch.randn(1, PACKED_MAX_ROWS + 1, 96, generator=generator).to(torch.bfloat16)
    assert torch.equal(packed(wide), layer(wide))
    with pytest.raises(ValueError, match="cannot pack"):
        PackedLinear(torch.nn.Linear(4, 4, dtype=torch.float64))


def test_where_onednn_converts_bfloat16_the_float32_copies_are_packed(monkeypatch):
    """With float32 copies (float32 weights, so the copies are the weights), a packed forward is the
    unpacked one up to summation order, its head packed too, and greedy decoding is unchanged."""
    from test_parity import random_drafter, random_prompt, speculative

    from redrafter import quant
    from redrafter.decode import DrafterProposer, SpeculativeDecoder

    monkeypatch.setattr(quant, "converts_bf16", lambda: True)
    model = tiny_target("qwen2", dtype=torch.float32)  # biases on the fused projections
    quant.quantize_target(model, "float", float32_gemms=True)
    prompt = torch.randint(1, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    tree, ancestors = a_tree(2)
    lean = target_forward(model)
    assert lean.packs() and packed_refusal(model) is None
    expected = forward_twice(model, lean, prompt, tree, ancestors)
    packed = target_forward(model, packed=None)
    got = forward_twice(model, packed, prompt, tree, ancestors)
    assert isinstance(packed, PackedForward) and lean.packed_layers[0].qkv.float32
    assert isinstance(packed.head, PackedLinear) and packed.head.linear is model.get_output_embeddings()
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    drafter = random_drafter(model, seed=2)
    prompts = [random_prompt(n + 2, n) for n in (1, 14)]
    outputs = []
    for choice in (False, True):
        proposer = DrafterProposer(drafter, 4, 4, tree_nodes=12)
        outputs.append(speculative(SpeculativeDecoder(model, proposer, [], lookup_len=6, packed=choice), prompts, 24))
    assert outputs[0] == outputs[1]


def test_packing_is_refused_where_it_does_not_apply():
    float64 = tiny_target("llama")
    assert "bfloat16 or float16" in packed_refusal(float64)
    assert target_forward(float64, packed=None) is target_forward(float64)  # where it does not apply: unpacked
    with pytest.raises(ValueError, match="packed: it needs float weights"):
        target_forward(float64, packed=True)
    assert "compiled forward is not packed" in packed_refusal(float64, compile=True)
    assert "packed forward needs the lean one" in packed_refusal(tiny_target("gemma3"))
