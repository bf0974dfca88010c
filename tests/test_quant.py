"""Weight-only quantized targets (``--weights int8|int4``).

- GGUF Q4_0/Q4_1 blocks become int4 codes, scales and zeros that dequantize to what the GGUF
  dequantizer gives (synthetic blocks with edge values, and a real tensor of the default model), and
  the CPU kernel applies those weights. Q8_0 blocks (the default model's head) become int4 codes over
  the input written twice that sum to the file's weights, and the quick argmax head built from them
  only proposes candidates: the greedy choice stays the float head's.
- Lossless per precision: on tiny float32 targets of every family, greedy speculative decoding with
  int8 or int4 weights equals plain greedy decoding with the same weights, token for token (the
  kernels give each row of a batch the same bits whatever the number of rows, checked here too), and
  exact sampling keeps the int4 target's distribution (chi-square).
- Bad input: an unknown precision, a layer the kernel cannot pack, a device or dtype without kernels.
- A quantized drafter (``--drafter-weights``): its draft logits stay close to the float drafter's,
  greedy output stays plain greedy's, and it cannot be saved (nor made where no kernel runs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_linear, tiny_target
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from test_parity import hf_greedy, random_drafter, random_prompt, speculative
from test_sampling import ROWS, chi_square_pvalue, exact_distribution, sampled_counts, sampling_target

from redrafter.cli import main
from redrafter.decode import DrafterProposer, SpeculativeDecoder, no_draft
from redrafter.drafter import DrafterError
from redrafter.lean_decoder import padded_product
from redrafter.quant import (
    ArgmaxHead,
    Int4Dense,
    Int4Linear,
    Int4Weight,
    Int8Linear,
    QuantizationError,
    _match_rows,
    gguf_int4,
    gguf_q8_0_as_int4,
    quantization_refusal,
    quantize_drafter,
    quantize_int4,
    quantize_target,
    w4a8_linear,
)
from redrafter.sampling import SamplingParams, exact_argmax


def q4_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw GGUF blocks ``[rows, cols / 32 * bytes]`` with edge values: zero, subnormal, largest and
    negative scales and minimums; all-0, all-15 and random codes."""
    rng = np.random.default_rng(seed)
    groups = rows * cols // 32
    d = rng.normal(0, 0.02, groups).astype(np.float16)
    m = rng.normal(0, 0.2, groups).astype(np.float16)
    edges = np.array([0.0, 6e-8, 65504.0, -0.5, 1e-3, -65504.0], dtype=np.float16)
    d[: len(edges)], m[-len(edges) :] = edges, edges
    codes = rng.integers(0, 16, (groups, 32), dtype=np.uint8)
    codes[0], codes[1] = 0, 15
    packed = codes[:, :16] | (codes[:, 16:] << 4)
    header = [d.view(np.uint8).reshape(groups, 2)]
    if type_name == "Q4_1":
        header.append(m.view(np.uint8).reshape(groups, 2))
    return np.concatenate([*header, packed], axis=1).reshape(rows, -1)


def block_bound(weight) -> torch.Tensor:
    """Per-weight bound on ``|m| + 16 |d|`` (the largest value a block's arithmetic touches)."""
    return (weight.zero.abs() + 24 * weight.scale.abs()).repeat_interleave(32, dim=1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_blocks_dequantize_to_what_the_gguf_dequantizer_gives(type_name):
    rows, cols = 32, 128
    raw = q4_blocks(type_name, rows, cols, seed=1)
    weight = gguf_int4(raw, type_name, (rows, cols))
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType[type_name]).reshape(rows, cols).copy())
    ours = weight.dequantize()
    # The codes and d are the file's exactly; (q - 8) d + (m + 8 d) in float32 against d q + m:
    # a few roundings of numbers no larger than |m| + 24 |d|.
    assert torch.all((ours - theirs).abs() <= 2**-21 * block_bound(weight))
    assert weight.codes.max() <= 15 and weight.codes.dtype == torch.uint8
    if type_name == "Q4_0":
        assert torch.equal(ours, theirs) and torch.all(weight.zero == 0)


@pytest.mark.parametrize("dtype,bits", [(torch.float32, 21), (torch.bfloat16, 7)])
def test_the_kernel_runs_the_files_weights(dtype, bits):
    """The int4 kernel on an identity input returns the weights it applies: the GGUF's values, within
    the rounding of the scales to the activations' dtype (2^-9 relative in bfloat16, stated in quant.py)."""
    rows, cols = 48, 96
    raw = q4_blocks("Q4_1", rows, cols, seed=2)
    raw_scales = raw.reshape(rows, cols // 32, 20)
    raw_scales[..., 0:2] = np.full(2, 0.01, np.float16).view(np.uint8)[None, None, :2]  # no overflow in bf16
    weight = gguf_int4(raw, "Q4_1", (rows, cols))
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).reshape(rows, cols).copy())
    applied = Int4Linear(weight, None, dtype)(torch.eye(cols, dtype=dtype)).float().T
    assert torch.all((applied - theirs).abs() <= 2**-bits * block_bound(weight))


@pytest.mark.integration
def test_a_real_q4_1_tensor_of_the_default_model():
    from gguf import GGUFReader

    from redrafter.models import ModelError, default_gguf_path

    try:
        path = default_gguf_path()
    except ModelError:
        pytest.skip("the default model is not installed")
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    weight = gguf_int4(tensor.data, "Q4_1", (rows, cols))
    theirs = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols).copy())
    assert torch.all((weight.dequantize() - theirs).abs() <= 2**-21 * block_bound(weight))


def q8_0_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw GGUF Q8_0 blocks ``[rows, cols / 32 * 34]`` with edge values: zero, subnormal, negative and
    large scales; values -128, 127, 0 and random."""
    rng = np.random.default_rng(seed)
    groups = rows * cols // 32
    d = rng.normal(0, 0.01, groups).astype(np.float16)
    edges = np.array([0.0, 6e-8, -0.5, 1e-3, 300.0], dtype=np.float16)
    d[: len(edges)] = edges
    values = rng.integers(-128, 128, (groups, 32), dtype=np.int16).astype(np.int8)
    values[0], values[1], values[2] = -128, 127, 0
    return np.concatenate([d.view(np.uint8).reshape(groups, 2), values.view(np.uint8)], axis=1).reshape(rows, -1)


def test_q8_0_blocks_become_int4_codes_that_sum_to_the_files_weights():
    rows, cols = 32, 128
    raw = q8_0_blocks(rows, cols, seed=4)
    pair = gguf_q8_0_as_int4(raw, (rows, cols))
    theirs = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0).reshape(rows, cols).copy())
    halves = pair.dequantize()
    assert pair.codes.shape == (rows, 2 * cols) and pair.codes.max() <= 15
    assert torch.equal(halves[:, :cols] + halves[:, cols:], theirs)  # 16 d (h - 8) + d l = d q, exact in float32
    # The kernel over the input written twice applies them (float32 scales: d exact, sums reordered).
    head = ArgmaxHead(Int4Linear(pair, None, torch.float32), True)
    applied = head(torch.eye(cols)).T
    assert torch.allclose(applied, theirs, rtol=2**-20, atol=2**-20 * float(theirs.abs().max()))


class NoisyHead(torch.nn.Module):
    """A stand-in quick head: the float head's logits plus noise of ``scale``, over few rows only."""

    def __init__(self, weight: torch.Tensor, scale: float, max_rows: int = 4) -> None:
        super().__init__()
        self.weight, self.scale, self.max_rows, self.calls = weight, scale, max_rows, 0

    def covers(self, hidden: torch.Tensor) -> bool:
        return hidden.numel() <= self.max_rows * hidden.shape[-1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = hidden.float() @ self.weight.float().T
        noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(self.calls))
        return (logits + self.scale * noise).to(hidden.dtype)

    def candidates(self, hidden: torch.Tensor, count: int) -> torch.Tensor:
        return self(hidden).topk(count, dim=-1).indices


def test_the_quick_head_proposes_candidates_and_the_float_head_chooses():
    """Candidate logits a little off (noise that reorders near-ties) leave the argmax the float32
    one; over more rows than the quick head covers, the float head gives the candidates."""
    model = tiny_target("llama", seed=0, dtype=torch.bfloat16)
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(1, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    hidden[0, 1] = hidden[0, 0]  # a tie broken only by the noise of the quick head
    exact = (hidden.float() @ weight.float().T).argmax(dim=-1)
    quick = NoisyHead(weight, scale=0.05)
    assert torch.equal(exact_argmax(model, hidden, argmax_head=quick), exact) and quick.calls == 1
    wide = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact_argmax(model, wide, argmax_head=quick)  # 6 rows > 4: not called
    assert quick.calls == 1
    # The float32 choice is what decides: a quick head that ranks the winner second still loses it.
    logits = hidden.float() @ weight.float().T
    top2 = logits.topk(2).values
    demoted = logits - 1.01 * (top2[..., :1] - top2[..., 1:]) * torch.nn.functional.one_hot(exact, weight.shape[0])
    assert not torch.equal(demoted.argmax(dim=-1), exact)
    wrong = NoisyHead(weight, scale=0.0)
    wrong.forward = lambda h: demoted
    assert torch.equal(exact_argmax(model, hidden, argmax_head=wrong), exact)


def test_rows_permuted_by_the_converter_are_matched_and_others_refused():
    raw = q4_blocks("Q4_1", 32, 64, seed=3)
    weight = gguf_int4(raw, "Q4_1", (32, 64))
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    module = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        module.weight.copy_(weight.dequantize()[order])
    matched = _match_rows(weight, module)
    assert matched is not None and torch.equal(matched.dequantize(), module.weight)
    with torch.no_grad():
        module.weight[3, 5] += 1.0  # a value the file does not hold
    assert _match_rows(weight, module) is None


def test_quantization_from_weights_is_within_half_a_step():
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    int4 = quantize_int4(weight)
    assert torch.all((int4.dequantize() - weight).abs() <= int4.scale.repeat_interleave(32, 1) / 2 + 1e-6)
    int8 = Int8Linear(weight, None, torch.float32)
    dequantized = int8.codes.float() * int8.scales[:, None]
    assert torch.all((dequantized - weight).abs() <= int8.scales[:, None] / 2 + 1e-6)
    assert torch.allclose(int8(torch.eye(96)).T, dequantized, atol=1e-5)


@pytest.mark.parametrize("weights", ["int8", "int4", "w4a8"])
def test_a_rows_result_does_not_depend_on_the_batch(weights):
    """What makes lossless decoding possible with these kernels: a tree of N tokens and a single
    token give each row bitwise the same output."""
    if weights not in KERNELS:
        pytest.skip(quantization_refusal("cpu", torch.bfloat16, weights))
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    layers = {
        "int4": lambda: Int4Linear(quantize_int4(weight), None, torch.float32),
        "int8": lambda: Int8Linear(weight, None, torch.float32),
        "w4a8": lambda: w4a8_linear(quantize_int4(weight), None, torch.float32),
    }
    layer = layers[weights]()
    x = torch.randn(2, 17, 128, generator=torch.Generator().manual_seed(2))
    full = layer(x)
    assert torch.equal(layer(x[:1, :1]), full[:1, :1])
    assert torch.equal(layer(x[1:, 3:9]), full[1:, 3:9])


def test_padded_products_give_each_row_what_the_layer_gives():
    """The rows a compiled forward pads its int4 products with (zeros, up to a bucket) change no
    real row's output, and are dropped; past the last bucket nothing is padded."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    layer = Int4Linear(quantize_int4(weight), None, torch.float32)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    for buckets in [(1, 4, 16), (1, 4, 8), ()]:
        got = padded_product(layer, x, buckets)
        assert got.shape == (3, 5, 64) and torch.equal(got, layer(x))


# Every precision with a kernel on this machine (w4a8 needs AVX-512 VNNI).
KERNELS = [w for w in ("int8", "int4", "w4a8") if quantization_refusal("cpu", torch.bfloat16, w) is None]


def quantized_tiny(family: str, weights: str, seed: int = 0):
    model = tiny_target(family, seed=seed, dtype=torch.float32)
    report = quantize_target(model, weights)
    assert report.from_weights == 7 * model.config.num_hidden_layers and report.from_file == 0
    return model


@pytest.mark.parametrize("weights", ["int8", "int4", "w4a8"])
def test_greedy_parity_with_quantized_weights(family, weights):
    if weights not in KERNELS:
        pytest.skip(quantization_refusal("cpu", torch.bfloat16, weights))
    model = quantized_tiny(family, weights)
    plain = SpeculativeDecoder(model, no_draft, [])
    drafter = random_drafter(model, seed=5).float()
    proposer = DrafterProposer(drafter, 3, 4, tree_nodes=6)
    decoder = SpeculativeDecoder(model, proposer, [], lookup_len=6)
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (1, 6, 15)]
    ids, _ = speculative(decoder, prompts, 30)  # a batch of mixed lengths
    expected, _ = speculative(plain, prompts, 30)
    assert ids == expected
    accepted, per_step = speculative(decoder, prompts[2:], 30)
    assert max(per_step) > 1  # drafts were accepted, so the tree forward was exercised
    # The int path is the model's own: transformers' generate with the same modules agrees.
    assert accepted[0] == hf_greedy(model, prompts[2], 30)


@pytest.mark.parametrize("weights", ["int4", "w4a8"])
def test_sampling_keeps_the_quantized_targets_distribution(weights):
    """The chi-square test of test_sampling on an int4 and a w4a8 target (layers wide enough to pack)."""
    if weights not in KERNELS:
        pytest.skip(quantization_refusal("cpu", torch.bfloat16, weights))
    model = sampling_target(hidden_size=32, kv_heads=2, scale=8.0, dtype=torch.float32)
    assert quantize_target(model, weights).from_weights == 14
    params = SamplingParams(temperature=1.0, seed=7)
    exact = exact_distribution(model, params)
    assert max(exact.values()) < 0.5  # neither flat nor one-hot
    counts = sampled_counts(model, params, lookup_len=4, ngram_len=4, tree_nodes=4)
    assert sum(counts.values()) == ROWS
    assert chi_square_pvalue(exact, counts) > 1e-3


def test_bad_input_is_refused_in_one_line(model_dir, capsys):
    model = tiny_target("llama", dtype=torch.float32)
    with pytest.raises(QuantizationError, match="unknown weight precision"):
        quantize_target(model, "int3")
    with pytest.raises(QuantizationError, match="cannot pack"):
        odd = tiny_target("llama", dtype=torch.float32)
        odd.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 40, bias=False)
        quantize_target(odd, "int4")
    with pytest.raises(QuantizationError, match="bfloat16, float16 or float32"):
        quantize_target(tiny_target("llama"), "int8")  # float64
    for argv, message in [
        (["--weights", "int5"], "invalid choice"),
        (["--weights", "int4", "--dtype", "float64"], "need --dtype bfloat16, float16 or float32"),
        (["--weights", "int4", "--device", "meta"], "CPU kernels"),
    ]:
        code = None
        try:
            code = main(["generate", "w5 w6", "--model", str(model_dir), "--drafter", "none", *argv])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_generates_with_int4_weights(model_dir, drafter_dir, capsys):
    import json

    outputs = {}
    for drafter in ("none", str(drafter_dir)):
        argv = ["generate", "w5 w6 w7", "--model", str(model_dir), "--drafter", drafter, "--weights", "int4"]
        assert main([*argv, "--dtype", "float32", "--json", "--max-new-tokens", "12"]) == 0
        outputs[drafter] = json.loads(capsys.readouterr().out)
    assert outputs["none"]["weights"] == "int4" and outputs["none"]["peak_rss_mb"] > 0
    assert outputs["none"]["token_ids"] == outputs[str(drafter_dir)]["token_ids"]


def test_each_precision_takes_its_own_default_tree_unless_one_is_given(model_dir, drafter_dir):
    from redrafter.api import (
        DEFAULT_DRAFTER_WEIGHTS,
        DEFAULT_LONE_TREE,
        DEFAULT_SHAPES,
        DEFAULT_SMALL_TREE,
        ReDrafter,
        default_small_tree,
    )
    from redrafter.quant import WEIGHTS, converts_bf16

    converts = converts_bf16()  # float weights take the small tree where oneDNN converts bfloat16

    # a default for every precision
    assert tuple(DEFAULT_SHAPES) == WEIGHTS == tuple(DEFAULT_DRAFTER_WEIGHTS) == tuple(DEFAULT_SMALL_TREE)
    assert tuple(DEFAULT_LONE_TREE) == WEIGHTS
    for weights, shape in DEFAULT_SHAPES.items():
        if quantization_refusal("cpu", torch.bfloat16, weights) is not None:
            continue  # w4a8 without AVX-512 VNNI
        rd = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="bfloat16", weights=weights)
        assert (rd.num_beams, rd.draft_len, rd.lookup_len, rd.ngram_len, rd.tree_nodes) == (
            shape.num_beams,
            shape.draft_len,
            shape.lookup_len,
            shape.ngram_len,
            shape.tree_nodes,
        )
        assert rd.quantization.weights == weights and rd.drafter_weights == DEFAULT_DRAFTER_WEIGHTS[weights]
        small = default_small_tree(weights, "cpu", torch.bfloat16)
        expected = weights in ("int4", "w4a8") or (weights == "float" and converts)
        assert small == expected  # offered; a tree of the lookup beams alone (w4a8) has nothing smaller
        assert ("small_tree" in rd.decoder.kinds) == (small and shape.num_beams > 0)
        assert rd.lone_tree == rd.decoder.policy.lone_tree == (weights == "w4a8")
    given = ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float32", weights="int4", num_beams=5)
    assert given.num_beams == 5 and given.draft_len == DEFAULT_SHAPES["int4"].draft_len
    # The int kernels run float32 activations unvectorized: a float32 drafter stays float unless asked.
    assert given.drafter_weights == "float"
    # No CPU kernel for float64: the drafter keeps its weights unless asked, and then it is refused.
    assert ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float64").drafter_weights == "float"
    with pytest.raises(QuantizationError, match="bfloat16, float16 or float32"):
        ReDrafter.from_pretrained(model_dir, drafter=drafter_dir, dtype="float64", drafter_weights="int8")


@pytest.mark.parametrize("weights", ["int8", "int4", "w4a8"])
def test_a_quantized_drafter_changes_drafts_a_little_and_output_not_at_all(weights):
    if weights not in KERNELS:
        pytest.skip(quantization_refusal("cpu", torch.bfloat16, weights))
    """A drafter with weight-only quantized layers and vocabulary rows: its draft logits stay close
    to the float drafter's, it still gets drafts accepted, and greedy output is plain greedy's."""
    model = tiny_target("llama", dtype=torch.float32)
    drafter = random_drafter(model, seed=3, tied_head=True).float().attach(model.get_input_embeddings())
    quantized = quantize_drafter(drafter, weights)
    assert quantized is not drafter and quantized.vocab_head is not None
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    hidden, state = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    exact, approx = drafter.head(hidden, state), quantized.head(hidden, state)
    assert (approx - exact).norm() / exact.norm() < (0.02 if weights == "int8" else 0.2)
    embedding = quantized.embed(torch.tensor([[3, 9]]))  # the first state (s_0 = 0) skips U's product
    first = torch.nn.functional.silu(quantized.rnn_w(embedding) + quantized.rnn_u(torch.zeros_like(embedding)))
    assert torch.equal(quantized.rnn_step(None, embedding), first)
    plain = SpeculativeDecoder(model, no_draft, [])
    decoder = SpeculativeDecoder(model, DrafterProposer(quantized, 3, 4, tree_nodes=6), [], lookup_len=6)
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (1, 6, 15)]
    ids, per_step = speculative(decoder, prompts, 30)
    assert ids == speculative(plain, prompts, 30)[0]
    assert max(per_step) > 1
    assert quantize_drafter(drafter, "float") is drafter


def test_a_quantized_drafter_is_refused_where_it_cannot_run_or_be_saved(tmp_path):
    model = tiny_target("llama", dtype=torch.float32)
    drafter = random_drafter(model, seed=3).float()
    with pytest.raises(QuantizationError, match="unknown weight precision"):
        quantize_drafter(drafter, "int3")
    with pytest.raises(QuantizationError, match="bfloat16, float16 or float32"):
        quantize_drafter(random_drafter(model, seed=3), "int8")  # float64
    with pytest.raises(DrafterError, match="for decoding only"):
        quantize_drafter(drafter, "int8").save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()


def test_cli_drafts_with_a_quantized_drafter(model_dir, drafter_dir, capsys):
    import json

    outputs = {}
    for weights in ("float", "int4"):
        argv = ["generate", "w5 w6 w7", "--model", str(model_dir), "--drafter", str(drafter_dir), "--json"]
        assert main([*argv, "--drafter-weights", weights, "--dtype", "float32", "--max-new-tokens", "12"]) == 0
        outputs[weights] = json.loads(capsys.readouterr().out)
    assert outputs["float"]["token_ids"] == outputs["int4"]["token_ids"]
    code = None
    try:
        code = main(["generate", "w5", "--model", str(model_dir), "--drafter-weights", "int4", "--dtype", "float64"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "need --dtype bfloat16, float16 or float32" in err and "Traceback" not in err, err


def test_float32_gemms_round_what_the_layer_computes():
    """Fewer rows than ``min_rows``: the bfloat16 layer itself; more: float32 GEMM of the same values,
    rounded once to bfloat16."""
    from redrafter.quant import Float32GemmLinear

    linear, generator = random_linear(64, 48, seed=3)
    layer = Float32GemmLinear.wrap(linear, min_rows=4)
    assert layer.weight is linear.weight and "weight32" not in layer.state_dict()
    x = torch.randn(1, 5, 64, generator=generator).bfloat16()
    assert torch.equal(layer(x[:, :3]), linear(x[:, :3]))
    wide = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()).bfloat16()
    assert torch.equal(layer(x), wide)


@pytest.mark.parametrize("lean", [True, False])
def test_float32_gemms_are_wired_into_every_float_layer_and_the_head(lean):
    """In float32 the float32 GEMM is the layer's own product, so decoding through the wrapped layers
    (the lean forward's fused copies included) must give exactly the unwrapped model's output."""
    from redrafter.lean_decoder import target_forward
    from redrafter.quant import Float32GemmLinear

    plain_model = tiny_target("llama", dtype=torch.float32)
    model = tiny_target("llama", dtype=torch.float32)
    head_weight = model.get_output_embeddings().weight
    report = quantize_target(model, "float", float32_gemms=True)
    layers = model.config.num_hidden_layers
    assert report.float32_gemm_layers == 7 * layers + 1
    head = model.get_output_embeddings()
    assert isinstance(head, Float32GemmLinear) and head.weight is head_weight  # the same parameter (a tie holds)
    assert quantize_target(tiny_target("llama", dtype=torch.float32), "float").float32_gemm_layers == 0  # not by itself
    if lean:
        fused = target_forward(model).layers[0].qkv
        assert isinstance(fused, Float32GemmLinear)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.weight32.untyped_storage().data_ptr() == fused.weight32.untyped_storage().data_ptr()
    prompts = [random_prompt(n + 2, n) for n in (1, 14)]  # a prefill of 16 tokens runs the float32 GEMMs
    drafter = random_drafter(model, seed=2).float()
    outputs = []
    for target in (plain_model, model):
        decoder = SpeculativeDecoder(target, DrafterProposer(drafter, 4, 4, tree_nodes=12), [], lookup_len=6, lean=lean)
        outputs.append(speculative(decoder, prompts, 24))
    assert outputs[0] == outputs[1]


def test_only_cpus_without_half_gemms_get_float32_gemms():
    from redrafter.quant import has_bf16_instructions, lacks_half_gemm

    assert not lacks_half_gemm("cpu", torch.float32) and not lacks_half_gemm("cpu", torch.float64)
    assert not lacks_half_gemm("cuda:0", torch.bfloat16)
    assert lacks_half_gemm("cpu", torch.bfloat16) == (not has_bf16_instructions())


@pytest.mark.parametrize(
    "machine, onednn, avx512_bf16, amx, native",
    [
        ("x86_64", True, False, False, False),  # plain AVX-512 (an Ice Lake Xeon): oneDNN converts as it goes
        ("x86_64", True, True, False, True),  # AVX-512 BF16 (Zen 4, Cooper Lake)
        ("x86_64", True, False, True, True),  # AMX (Sapphire Rapids and later)
        ("x86_64", False, False, False, False),  # AVX2 only
        ("aarch64", True, False, False, True),  # elsewhere oneDNN's answer stands
        ("aarch64", False, False, False, False),
    ],
)
def test_bf16_instructions_need_more_than_onednns_emulation_on_x86(
    monkeypatch, machine, onednn, avx512_bf16, amx, native
):
    from redrafter import quant

    monkeypatch.setattr(quant.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert quant.has_bf16_instructions() == native
    assert quant.lacks_half_gemm("cpu", torch.bfloat16) == (not native)
    assert quant.packs_linears("cpu", torch.bfloat16) == native
    # Where oneDNN converts as it goes: float32 GEMMs from two rows, on float32 copies packed once.
    converting = onednn and not native
    assert quant.converts_bf16() == converting
    from redrafter.api import default_small_tree as small

    assert small("float", "cpu", torch.bfloat16) == converting and small("int4", "cpu", torch.bfloat16)
    assert not small("float", "cpu", torch.float32) and not small("float", "cuda", torch.bfloat16)
    assert quant.float32_gemm_min_rows() == (2 if converting else 12)
    assert quant.packs_float32_copies("cpu") == converting and not quant.packs_float32_copies("cuda:0")
    layer = quant.Float32GemmLinear.wrap(torch.nn.Linear(8, 4, dtype=torch.bfloat16))
    assert quant.packable(layer) == converting


def test_an_int4_layer_keeps_the_values_its_kernel_runs_for_prefills():
    """``dense_dtype``: the layer also holds its weights dequantized (float32 here) as the kernel runs
    them, its scales and zeros rounded to the activations' dtype: the float32 kernel fed those
    rounded tables multiplies by exactly these values. Fused layers keep their parts' rows in order."""
    weight = quantize_int4(torch.randn(64, 128, generator=torch.Generator().manual_seed(1)))
    layer = Int4Linear(weight, None, torch.bfloat16, dense_dtype=torch.float32)
    rounded = Int4Weight(weight.codes, weight.scale.bfloat16().float(), weight.zero.bfloat16().float(), weight.minimum)
    exact = Int4Linear(rounded, None, torch.float32)
    assert torch.equal(layer.dense, exact(torch.eye(128)).T)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert torch.allclose(layer.dense_product(x).float(), layer(x).float(), rtol=0.02, atol=0.02)
    other = Int4Linear(quantize_int4(torch.randn(64, 128)), None, torch.bfloat16, dense_dtype=torch.float32)
    fused = Int4Linear.fused([layer, other])
    assert torch.equal(fused.dense, torch.cat([exact(torch.eye(128)).T, other.dense]))
    assert torch.equal(fused.dense_product(x), torch.cat([layer.dense_product(x), other.dense_product(x)], dim=-1))
    assert Int4Linear(weight, None, torch.bfloat16).dense is None


def test_a_bfloat16_int4_target_prefills_on_dense_weights_and_decodes_on_the_kernel(monkeypatch):
    """An int4 target in bfloat16 keeps dense copies (float32 where bfloat16 products lack
    instructions): a prefill of at least DENSE_PREFILL_MIN_ROWS tokens runs on them, a shorter one
    and every decode step on the int4 kernel, so greedy speculative output still equals plain
    greedy output token for token (both prefill alike; the kernel gives each row the same bits)."""
    model = tiny_target("llama", dtype=torch.bfloat16)
    report = quantize_target(model, "int4")
    assert report.dense_bytes > 0 and report.dense_bytes not in (0, report.linear_bytes)
    rows_seen: list[tuple[bool, int]] = []
    dense_forward, int4_forward = Int4Dense.forward, Int4Linear.forward

    def spy_dense(self, x):
        rows_seen.append((True, x.numel() // x.shape[-1]))
        return dense_forward(self, x)

    def spy_int4(self, x):
        rows_seen.append((False, x.numel() // x.shape[-1]))
        return int4_forward(self, x)

    monkeypatch.setattr(Int4Dense, "forward", spy_dense)
    monkeypatch.setattr(Int4Linear, "forward", spy_int4)
    plain = SpeculativeDecoder(model, no_draft, [])
    drafter = random_drafter(model, seed=5).bfloat16()
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4, tree_nodes=6), [], lookup_len=6)
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (3, 9, 20)]

    def prefilled_dense_then_decoded_on_the_kernel() -> bool:
        """The first forward (a prefill of 3 rows of 22: one group) on dense weights, none after it."""
        flags = [dense for dense, _ in rows_seen]
        first = flags.index(False)
        prefill = {rows for _, rows in rows_seen[:first]}
        return first >= 4 * model.config.num_hidden_layers and prefill == {3 * 22} and not any(flags[first:])

    ids, _ = speculative(decoder, prompts, 24)
    assert prefilled_dense_then_decoded_on_the_kernel()
    rows_seen.clear()
    expected, _ = speculative(plain, prompts, 24)
    assert prefilled_dense_then_decoded_on_the_kernel()
    assert ids == expected
    rows_seen.clear()
    speculative(plain, [prompts[1][:10]], 4)  # 10 tokens: prefilled by the kernel
    assert rows_seen and not any(dense for dense, _ in rows_seen)
