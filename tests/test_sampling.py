"""Exact sampling: speculative sampling draws from the target's own distribution.

A tiny float64 target with an 8-token vocabulary; the exact joint distribution of the first three
generated tokens is enumerated; thousands of rows (one batch) are sampled through the speculative
loop with a drafter whose drafts are often accepted; a chi-square test must accept the match, and
must reject a deliberately wrong acceptance rule (every draft of the first beam accepted).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from test_guess import SureGuess
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import redrafter.decode as decode_module
from redrafter.confidence import GRID_SHAPE
from redrafter.decode import DrafterProposer, SpeculativeDecoder, no_draft
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.errors import RedrafterError
from redrafter.ngrams import build_table
from redrafter.sampling import SamplingParams, probabilities
from redrafter.verify import Verdict, verify

VOCAB, NEW, ROWS = 8, 3, 6000
PROMPT = [1, 5, 2]


def sampling_target(
    hidden_size: int = 16,
    kv_heads: int = 1,
    scale: float = 12.0,
    dtype: torch.dtype = torch.float64,
    sliding_window: int | None = None,
) -> LlamaForCausalLM | MistralForCausalLM:
    """A tiny Llama over the 8-token vocabulary, weights scaled so its distributions are neither flat
    nor one-hot; with ``sliding_window``, a Mistral whose layers see that many tokens."""
    torch.manual_seed(0)
    family, window = (
        (LlamaConfig, {}) if sliding_window is None else (MistralConfig, {"sliding_window": sliding_window})
    )
    config = family(
        **window,
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = (LlamaForCausalLM if sliding_window is None else MistralForCausalLM)(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


@pytest.fixture(scope="module")
def target():
    return sampling_target()


def exact_distribution(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3) by enumeration with the same logits processing as plain sampling."""
    dist = {}
    with torch.no_grad():
        for seq in itertools.product(range(VOCAB), repeat=NEW - 1):
            logits = model(torch.tensor([PROMPT + list(seq)])).logits[0, len(PROMPT) - 1 :]
            p = probabilities(logits, params)
            for last in range(VOCAB):
                prob = 1.0
                for i, tok in enumerate((*seq, last)):
                    prob *= float(p[i, tok])
                dist[(*seq, last)] = prob
    return dist


def sampled_counts(
    model,
    params: SamplingParams,
    lookup_len: int = 0,
    ngram_len: int = 0,
    tree_nodes: int = 0,
    rnn_cell: str = "reference",
    lookup_nodes: int = 0,
    guess: bool = False,
) -> dict[tuple[int, ...], int]:
    torch.manual_seed(1)
    config = DrafterConfig(hidden_size=model.config.hidden_size, vocab_size=VOCAB, rnn_cell=rnn_cell)
    drafter = RecurrentDrafter(config).to(model.dtype)
    drafter.attach(model.get_input_embeddings())
    # A table of random text: its drafts are deterministic guesses, as a real corpus's are.
    text = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    table = build_table([text], min_n=1, max_n=2, min_count=1)
    table.confidence = np.full(GRID_SHAPE, 0.5, dtype=np.float32)  # every guess worth a node: branching trees
    proposer = no_draft if guess else DrafterProposer(drafter, 3, 3, tree_nodes)
    decoder = SpeculativeDecoder(
        model, proposer, [], lookup_len, table, ngram_len, lookup_nodes=lookup_nodes, node_costs=(1.0,) * 8,
        guess=SureGuess(drafter) if guess else None,  # the drafter's token in every tree
    )  # fmt: skip
    rows: list[list[int]] = [[] for _ in range(ROWS)]
    accepted_drafts = 0
    for step in decoder.decode([PROMPT] * ROWS, NEW, params):
        for row, tokens in zip(step.rows, step.tokens, strict=True):
            rows[row].extend(tokens)
            accepted_drafts += len(tokens) - 1
    assert accepted_drafts > ROWS // 8, "the test must exercise accepted drafts"
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return counts


def chi_square_pvalue(exact: dict, counts: dict) -> float:
    """Pearson chi-square over the joint outcomes, cells with expected count < 5 pooled."""
    observed, expected, pool_obs, pool_exp = [], [], 0, 0.0
    for outcome, prob in exact.items():
        if prob * ROWS >= 5:
            observed.append(counts.get(outcome, 0))
            expected.append(prob * ROWS)
        else:
            pool_obs += counts.get(outcome, 0)
            pool_exp += prob * ROWS
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    elif pool_obs > 0:
        return 0.0  # outcomes the target can never produce
    total = sum(observed)
    expected = [e * total / sum(expected) for e in expected]
    return float(chisquare(observed, expected).pvalue)


SETTINGS = [
    SamplingParams(temperature=1.0, seed=3),
    SamplingParams(temperature=0.6, seed=4),
    SamplingParams(temperature=1.5, top_k=3, seed=5),
    SamplingParams(temperature=1.0, top_p=0.7, seed=6),
]


@pytest.mark.parametrize(
    "lookup_len,ngram_len,tree_nodes",
    [(0, 0, 0), (4, 0, 0), (4, 4, 0), (4, 4, 4)],
    ids=["drafter", "drafter+lookup", "drafter+lookup+ngrams", "dynamic+lookup+ngrams"],
)
@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.6", "t1.5-topk3", "topp0.7"])
def test_speculative_sampling_matches_the_target_distribution(target, params, lookup_len, ngram_len, tree_nodes):
    exact = exact_distribution(target, params)
    assert abs(sum(exact.values()) - 1) < 1e-9
    pvalue = chi_square_pvalue(exact, sampled_counts(target, params, lookup_len, ngram_len, tree_nodes))
    assert pvalue > 1e-3, f"speculative samples do not follow the target's distribution (p={pvalue:.2e})"


def test_sampling_with_a_confidence_tree(target):
    """The lookup drafts as a confidence tree beside the drafter's beams: several guesses per node."""
    params = SamplingParams(temperature=1.0, seed=10)
    counts = sampled_counts(target, params, lookup_nodes=6)
    assert chi_square_pvalue(exact_distribution(target, params), counts) > 1e-3


def test_sampling_with_the_drafters_guess_in_a_confidence_tree(target):
    """The w4a8 defaults' shape: no drafted beam, the drafter's top token joining the lookups' at the root."""
    params = SamplingParams(temperature=1.0, seed=11)
    counts = sampled_counts(target, params, lookup_nodes=6, guess=True)
    assert chi_square_pvalue(exact_distribution(target, params), counts) > 1e-3


def test_sampling_with_a_trtllm_cell_drafter(target):
    params = SamplingParams(temperature=1.0, seed=8)
    counts = sampled_counts(target, params, lookup_len=4, tree_nodes=4, rnn_cell="trtllm")
    assert chi_square_pvalue(exact_distribution(target, params), counts) > 1e-3


def test_sampling_with_a_sliding_window_of_two_tokens():
    """Every layer sees the query and the one token before it: a tree token that saw more would
    change the distribution (the prompt and output are three windows long)."""
    model = sampling_target(sliding_window=2)
    params = SamplingParams(temperature=1.0, seed=9)
    counts = sampled_counts(model, params, lookup_len=4, tree_nodes=4)
    assert chi_square_pvalue(exact_distribution(model, params), counts) > 1e-3


def accept_first_beam(beams, node_index, target_choice) -> Verdict:
    """A wrong rule: every draft of beam 0 is accepted, then the target's token after it."""
    batch, _, length = beams.shape
    everything = verify(beams[:, :1], node_index[:, :1], target_choice)
    path = node_index[:, 0]
    bonus = target_choice.gather(1, path[:, -1:])
    tokens = torch.cat([beams[:, 0, 1:], bonus], dim=1)
    return Verdict(tokens=tokens, num_tokens=torch.full_like(everything.num_tokens, length), path=path)


@pytest.mark.parametrize("params", SETTINGS[:1] + SETTINGS[2:3], ids=["t1", "t1.5-topk3"])
def test_the_test_rejects_a_wrong_acceptance_rule(target, params, monkeypatch):
    monkeypatch.setattr(decode_module, "verify", accept_first_beam)
    pvalue = chi_square_pvalue(exact_distribution(target, params), sampled_counts(target, params))
    assert pvalue < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.9, 20, 0.9)])
def test_logit_processing_equals_transformers(temperature, top_k, top_p):
    logits = torch.randn(6, 50, dtype=torch.float64) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.allclose(probabilities(logits, params), expected.softmax(-1), atol=1e-12)


def test_seed_reproduces_and_temperature_zero_is_greedy(target):
    decoder = SpeculativeDecoder(target, lambda h, t, p: t[:, None, None], [])
    params = SamplingParams(1.0, seed=9)
    first = [s.tokens for s in decoder.decode([PROMPT] * 4, 10, params)]
    assert first == [s.tokens for s in decoder.decode([PROMPT] * 4, 10, params)]
    assert first != [s.tokens for s in decoder.decode([PROMPT] * 4, 10, SamplingParams(1.0, seed=10))]
    ids = [t for s in decoder.decode([PROMPT], 10, SamplingParams(0.0, seed=9)) for t in s.tokens[0]]
    hf = target.generate(
        torch.tensor([PROMPT]), attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=10, do_sample=False
    )[0, 3:].tolist()
    assert ids == hf


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_settings(kwargs):
    with pytest.raises(RedrafterError):
        SamplingParams(**kwargs)


def test_exact_argmax_breaks_bfloat16_ties_in_float32():
    from redrafter.sampling import exact_argmax

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).to(torch.bfloat16)
    with torch.no_grad():
        weight = torch.zeros(16, 8)
        weight[3, 0], weight[11, 0] = 16.0, 16.0
        weight[11, 1] = 0.03  # token 11 wins by 0.03: invisible at bfloat16's 0.125 step near 16
        model.lm_head.weight.copy_(weight)
    hidden = torch.tensor([[[1.0, 1.0, 0, 0, 0, 0, 0, 0]]], dtype=torch.bfloat16)
    logits = model.lm_head(hidden)
    assert logits[0, 0, 3] == logits[0, 0, 11] and logits.argmax(-1).item() == 3  # a bfloat16 tie
    assert exact_argmax(model, hidden).item() == 11


@pytest.mark.parametrize("beams,draft_len,lookup_len,tree_nodes", [(3, 3, 0, 0), (4, 5, 6, 0), (6, 4, 12, 9)])
def test_a_seeded_sample_is_the_same_with_and_without_speculation(beams, draft_len, lookup_len, tree_nodes):
    """Draws keyed by position: speculative sampling emits the very tokens plain sampling with the
    same seed emits (float64), whatever the tree, and a row's tokens do not depend on the batch."""
    from conftest import tiny_target
    from test_parity import random_drafter, random_prompt

    model = tiny_target("llama", seed=21)
    plain = SpeculativeDecoder(model, lambda h, t, p: t[:, None, None], [])
    drafter = random_drafter(model, seed=22)
    speculative = SpeculativeDecoder(model, DrafterProposer(drafter, beams, draft_len, tree_nodes), [], lookup_len)
    prompts = [random_prompt(5, 1), random_prompt(11, 2), random_prompt(3, 3)]

    def run(decoder, batch, params):
        out = [[] for _ in batch]
        for step in decoder.decode(batch, 30, params):
            for row, tokens in zip(step.rows, step.tokens, strict=True):
                out[row] += tokens
        return out

    for params in (SamplingParams(1.0, seed=5), SamplingParams(0.8, top_k=10, top_p=0.9, seed=6)):
        expected = run(plain, prompts, params)
        steps = sum(1 for _ in speculative.decode(prompts, 30, params))
        assert run(speculative, prompts, params) == expected and steps < 31  # drafts were accepted
        assert run(speculative, prompts[:1], params) == expected[:1]
        # A row's random stream is its index in the batch: reordered rows draw other samples.
        assert run(plain, prompts, params) != run(plain, prompts[::-1], params)[::-1]
