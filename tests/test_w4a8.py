"""The w4a8 kernel: a GGUF's own codes times int8 activations (redrafter.w4a8)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_quant import q4_blocks, q8_0_blocks

from redrafter import kernels
from redrafter.kernels import kernel_refusal
from redrafter.quant import QuantizationError, gguf_int4, gguf_q8_0, quantization_refusal, w4a8_linear
from redrafter.w4a8 import W4A8Linear

needs_kernel = pytest.mark.skipif(kernel_refusal() is not None, reason=str(kernel_refusal()))


def reference(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic written out: ``[M, K]`` x -> ``[M, N]`` float64, activations rounded to
    int8 per block of 32 (half to even), ``d`` and ``m`` to float16, the rest exact."""
    rows, columns = x.shape
    blocks = x.float().reshape(rows, columns // 32, 32)
    scale = blocks.abs().amax(-1) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    ints = torch.round(blocks * inverse[..., None]).double()  # float32 product, then rounded
    dots = torch.einsum("rbk,nbk->rnb", ints, codes.double().reshape(codes.shape[0], columns // 32, 32))
    d, m = d.half().double()[None], m.half().double()[None]
    return (scale.double()[:, None] * (d * dots + m * ints.sum(-1)[:, None])).sum(-1)


def random_layer(rows: int, columns: int, bits: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, columns), generator=generator, dtype=torch.uint8)
    d = torch.rand(rows, columns // 32, generator=generator) * 0.01
    m = torch.randn(rows, columns // 32, generator=generator) * 0.05
    return W4A8Linear(codes, d, m, bits, None, dtype), (codes, d, m)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_the_stated_arithmetic(bits, dtype):
    layer, (codes, d, m) = random_layer(80, 192, bits, seed=bits)
    layer.dtype = dtype
    x = torch.randn(37, 192, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    expected = reference(x, codes, d, m)
    got = layer(x).double()
    if dtype == torch.float32:  # float32 sums of 6 blocks: a few roundings
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    else:  # the output rounded once more, to bfloat16, by the kernel as PyTorch rounds
        assert torch.allclose(got, expected, rtol=2**-8, atol=2**-8 * float(expected.abs().max()))
        assert torch.equal(layer(x), layer(x.float()).to(torch.bfloat16))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_a_rows_result_does_not_depend_on_the_other_rows(bits):
    """What keeps speculative decoding lossless: a tree, a batch and a single token give a row the same
    bits (row blocks of 4 and panels of 64 cut the rows at different places)."""
    layer, _ = random_layer(48, 96, bits, seed=11)
    x = torch.randn(150, 96, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    full = layer(x)
    for start, stop in [(0, 1), (5, 6), (3, 10), (63, 66), (149, 150), (1, 150)]:
        assert torch.equal(layer(x[start:stop]), full[start:stop])


def screen_weights(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A w4a8 layer's own weights ``d u + m`` (float16 ``d``, ``m``) in float64: exact."""
    rows, columns = codes.shape
    groups = codes.double().reshape(rows, columns // 32, 32)
    return (groups * d.half().double()[..., None] + m.half().double()[..., None]).reshape(rows, columns)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("exact_dtype", [torch.bfloat16, torch.float32])
def test_argmax_is_the_exact_heads_even_where_the_screen_picks_another(bits, exact_dtype):
    """The certified argmax: the exact head's own (for bfloat16 weights, the float32 logits of
    BFloat16Head, the lower column among equals), also where the screen's outputs rank another column
    first; a row alone or among 70 alike."""
    from redrafter.head import BFloat16Head
    from redrafter.w4a8 import argmax_bounds

    layer, (codes, d, m) = random_layer(160, 96, bits, seed=31)
    screen = screen_weights(codes, d, m)
    generator = torch.Generator().manual_seed(6)
    exact = (screen + 0.002 * torch.randn(screen.shape, generator=generator, dtype=torch.float64)).to(exact_dtype)
    exact[7] = exact[40] = (3 * screen[7]).to(exact_dtype)  # two equal columns (far from the screen's)
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[3] = exact[7].to(torch.bfloat16)  # a row whose best is the tied pair: the lower column wins
    ids, checked = layer.argmax(x, exact, argmax_bounds(exact, screen))
    if exact_dtype == torch.bfloat16:
        logits = BFloat16Head(exact)(x.float())  # float32, in the kernel's order
        assert torch.equal(ids, logits.argmax(dim=-1))
    else:  # float32 sums in another order than PyTorch's: the best to within their rounding
        logits = x.double() @ exact.double().T
        assert (logits.gather(1, ids[:, None])[:, 0] >= logits.max(dim=-1).values - 1e-4).all()
    assert ids[3] == 7 and 40 not in ids.tolist()
    screen_best = layer(x.float()).argmax(dim=-1)
    assert (screen_best != ids).any()  # the screen alone would have picked another column somewhere
    assert (checked >= 1).all() and checked.float().median() < 40  # a few logits computed exactly, not all
    for start, stop in [(0, 1), (9, 10), (63, 66), (69, 70)]:
        assert torch.equal(layer.argmax(x[start:stop], exact, argmax_bounds(exact, screen))[0], ids[start:stop])
    assert layer.argmax(x[None, :3], exact, argmax_bounds(exact, screen))[0].shape == (1, 3)  # leading dims kept


@needs_kernel
def test_argmax_of_a_hidden_state_that_is_not_finite_is_a_column():
    """No candidate survives a NaN: every logit is computed, and the first NaN wins (torch.argmax's rule)."""
    from redrafter.w4a8 import argmax_bounds

    layer, (codes, d, m) = random_layer(32, 64, 8, seed=3)
    screen = screen_weights(codes, d, m)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[1, 5] = float("nan")
    ids, checked = layer.argmax(x, screen.to(torch.bfloat16), argmax_bounds(screen.to(torch.bfloat16), screen))
    assert ids[1] == 0 and checked[1] == 32 and 0 <= ids[0] < 32


@needs_kernel
def test_fused_layers_give_the_parts_outputs_and_the_parts_stay_whole():
    first, _ = random_layer(32, 64, 4, seed=1)
    second, _ = random_layer(48, 64, 4, seed=2)
    x = torch.randn(3, 64)
    alone = torch.cat([first(x), second(x)], dim=-1)
    fused = W4A8Linear.fused([first, second], None)
    assert torch.equal(fused(x), alone)
    assert torch.equal(torch.cat([first(x), second(x)], dim=-1), alone)
    assert first.codes.data_ptr() == fused.codes.data_ptr()  # views, not copies


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_q4_blocks_run_as_the_gguf_dequantizer_gives_them(type_name):
    """One-hot rows quantize to a single 127 and a scale of 1/127, so the product reads back the file's
    weights, d and m as stored: within float32's rounding of a few products of at most |m| + 15 |d|."""
    rows, cols = 32, 128
    raw = q4_blocks(type_name, rows, cols, seed=5)
    weight = gguf_int4(raw, type_name, (rows, cols))
    if type_name == "Q4_0":  # a scale of ±65504 leaves m = -8 d beyond float16: refused, not rounded
        with pytest.raises(QuantizationError, match="float16"):
            w4a8_linear(weight, None, torch.float32)
        scales = raw.reshape(rows, cols // 32, 18)[..., 0:2]
        scales[np.abs(scales.view(np.float16)[..., 0]) > 8000] = np.array([1.0], np.float16).view(np.uint8)
        weight = gguf_int4(raw, type_name, (rows, cols))
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    applied = w4a8_linear(weight, None, torch.float32)(torch.eye(cols)).T
    bound = (weight.minimum.abs() + 15 * weight.scale.abs()).repeat_interleave(32, dim=1)
    assert torch.all((applied - theirs).abs() <= 2**-21 * bound)


@needs_kernel
def test_q8_0_blocks_run_as_8_bit_codes():
    rows, cols = 32, 128
    raw = q8_0_blocks(rows, cols, seed=6)
    theirs = dequantize(raw, GGMLQuantizationType.Q8_0).reshape(rows, cols)
    shifted, d = gguf_q8_0(raw, (rows, cols))
    layer = W4A8Linear(shifted, d, -128 * d, 8, None, torch.float32)
    applied = layer(torch.eye(cols)).T
    bound = 128 * d.abs().repeat_interleave(32, dim=1)
    assert torch.all((applied - torch.from_numpy(theirs.copy())).abs() <= 2**-21 * bound)


def test_the_kernels_compile_where_the_cpu_has_their_instructions():
    """A compile error must fail here: elsewhere it only turns every kernel test into a skip."""
    has_compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not set(kernels.CPU_FLAGS) <= kernels._cpu_flags() or not has_compiler:
        pytest.skip("this CPU lacks AVX-512 VNNI, or there is no C compiler")
    assert kernel_refusal() is None


def test_without_the_cpus_instructions_or_a_compiler_w4a8_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: {"avx2", "fma"})
    kernels._build.cache_clear()
    try:
        reason = quantization_refusal("cpu", torch.bfloat16, "w4a8")
        assert reason is not None and "AVX-512 VNNI" in reason and "\n" not in reason
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: set(kernels.CPU_FLAGS))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        kernels._build.cache_clear()
        reason = kernel_refusal()
        assert reason is not None and "C compiler" in reason
        with pytest.raises(RuntimeError, match="C compiler"):
            random_layer(16, 32, 4, seed=0)
    finally:
        kernels._build.cache_clear()


@needs_kernel
def test_w4a8_decodes_with_its_head_and_refuses_compile_in_one_line(model_dir, drafter_dir):
    from redrafter.api import ReDrafter
    from redrafter.errors import RedrafterError

    rd = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="bfloat16", weights="w4a8")
    assert rd.quantization.weights == "w4a8" and rd.quantization.dense_bytes == 0
    mlp = rd.target.model.layers[0].mlp
    assert all(isinstance(getattr(mlp, name), W4A8Linear) for name in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(RedrafterError, match="w4a8 kernel") as refused:
        ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="bfloat16", weights="w4a8", compile=True)
    assert "\n" not in str(refused.value)


@needs_kernel
@pytest.mark.integration
def test_the_default_model_runs_its_own_codes_and_q8_0_head_through_w4a8():
    """All 210 Q4_1 layers of the default GGUF and its Q8_0 head as stored: the quick head's logits are
    the bfloat16 head's up to the int8 rounding of the activations, and its certified argmax is the
    bfloat16 head's float32 one (on hidden states of the size the model's own have, and larger)."""
    from redrafter.api import ReDrafter
    from redrafter.head import BFloat16Head

    rd = ReDrafter.from_pretrained("default", drafter="none", weights="w4a8")
    assert rd.quantization.from_file == 210 and rd.quantization.dense_bytes == 0
    assert isinstance(rd.argmax_head.linear, W4A8Linear) and rd.argmax_head.linear.bits == 8
    hidden = torch.randn(3, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        quick = rd.argmax_head(hidden).float()
        exact = hidden.float() @ rd.target.get_output_embeddings().weight.float().T
    assert float((quick - exact).abs().max()) < 0.1 * float(exact.std())  # measured: 0.13 against 2.4
    assert rd.argmax_head.certifies
    many = torch.randn(64, 576, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.5, 40, 64)[:, None]
    with torch.inference_mode():
        for rows in (hidden, many.to(torch.bfloat16)):
            float_head = BFloat16Head(rd.target.get_output_embeddings().weight)(rows.float())
            assert torch.equal(rd.argmax_head.argmax(rows), float_head.argmax(dim=-1))
    assert rd.generate("Name three colors.", max_new_tokens=8).text.strip()
