"""Lossless greedy decoding: speculative output equals ``model.generate(do_sample=False)`` exactly.

float64 tiny random targets of five families, random drafters, many prompts, W and L, through
EOS and max-token boundaries. And an oracle drafter whose drafts are right gets every one accepted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import COMMON, HIDDEN, VOCAB, tiny_target
from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

from redrafter.decode import DrafterProposer, SpeculativeDecoder, no_draft
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.ngrams import build_table


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def speculative(decoder: SpeculativeDecoder, prompts: list[list[int]], max_new_tokens: int):
    """Run the loop; return generated ids per prompt and tokens emitted per step (row 0)."""
    ids: list[list[int]] = [[] for _ in prompts]
    per_step: list[int] = []
    for step in decoder.decode(prompts, max_new_tokens):
        for row, tokens in zip(step.rows, step.tokens, strict=True):
            ids[row].extend(tokens)
        if 0 in step.rows:
            per_step.append(len(step.tokens[step.rows.index(0)]))
    return ids, per_step


def random_drafter(model, seed: int, **kwargs) -> RecurrentDrafter:
    torch.manual_seed(seed)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **kwargs))
    return drafter.to(torch.float64).attach(model.get_input_embeddings()).eval()


def random_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("beams,draft_len", [(1, 2), (4, 5), (3, 3), (8, 4), (2, 7)])
def test_greedy_parity_across_families(family, beams, draft_len):
    model = tiny_target(family)
    drafter = random_drafter(model, seed=beams * 10 + draft_len)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, beams, draft_len), eos_token_ids=[])
    for seed, (length, max_new) in enumerate([(1, 20), (5, 33), (17, 7), (40, 1)]):
        prompt = random_prompt(length, seed)
        ids, _ = speculative(decoder, [prompt], max_new)
        assert ids[0] == hf_greedy(model, prompt, max_new), f"{family} W={beams} L={draft_len} prompt {seed}"


def test_greedy_parity_with_a_trtllm_cell_drafter(family):
    model = tiny_target(family, seed=6)
    drafter = random_drafter(model, seed=6, rnn_cell="trtllm")
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4, tree_nodes=5), [], lookup_len=5)
    prompts = [random_prompt(length, seed) for seed, length in enumerate([2, 9, 4])]
    ids, _ = speculative(decoder, prompts, 24)
    for k, prompt in enumerate(prompts):
        assert ids[k] == hf_greedy(model, prompt, 24), f"{family} trtllm cell prompt {k}"


@pytest.mark.parametrize("beams,draft_len,tree_nodes", [(2, 4, 6), (4, 5, 7), (3, 3, 2)])
def test_dynamic_tree_keeps_parity(family, beams, draft_len, tree_nodes):
    model = tiny_target(family, seed=4)
    drafter = random_drafter(model, seed=beams * 10 + draft_len)
    proposer = DrafterProposer(drafter, beams, draft_len, tree_nodes)
    decoder = SpeculativeDecoder(model, proposer, eos_token_ids=[], lookup_len=6)
    prompts = [random_prompt(length, seed) for seed, length in enumerate([1, 5, 17, 3])]
    ids, _ = speculative(decoder, prompts, 25)  # one batch of mixed lengths
    for k, prompt in enumerate(prompts):
        assert ids[k] == hf_greedy(model, prompt, 25), f"{family} W={beams} L={draft_len} prompt {k}"


@pytest.mark.parametrize("lookup_len", [2, 4, 9])
def test_context_lookup_beam_keeps_parity(family, lookup_len):
    model = tiny_target(family, seed=9)
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=9), 3, 4), [], lookup_len)
    longest = 0
    for seed, (length, max_new) in enumerate([(1, 40), (9, 33), (24, 7), (30, 1)]):
        prompt = random_prompt(length // 3 + 1, seed) * 3  # repeated text: the lookup finds matches
        ids, per_step = speculative(decoder, [prompt], max_new)
        assert ids[0] == hf_greedy(model, prompt, max_new), f"{family} lookup {lookup_len} prompt {seed}"
        longest = max(longest, *per_step)
    if lookup_len > 4:  # some step accepted more than the drafter's own beams could give
        assert longest > 4


@pytest.mark.parametrize("ngram_len", [2, 6])
def test_ngram_beam_keeps_parity(family, ngram_len):
    model = tiny_target(family, seed=9)
    prompts = [random_prompt(n, 100 + n) for n in (2, 7, 12)]
    # The table knows the target's own continuations of other prompts and the first part of these
    # (so its drafts are often right, then wrong past what it saw), and noise.
    corpus = [hf_greedy(model, random_prompt(5, s), 30) for s in range(6)]
    corpus += [hf_greedy(model, p, 20) for p in prompts] + [random_prompt(40, 999)]
    table = build_table(corpus, min_n=1, max_n=4, min_count=1)
    proposer = DrafterProposer(random_drafter(model, seed=9), 3, 3)
    decoder = SpeculativeDecoder(model, proposer, [], lookup_len=0, ngrams=table, ngram_len=ngram_len)
    longest = 0
    for k, prompt in enumerate(prompts):
        ids, per_step = speculative(decoder, [prompt], 35)
        assert ids[0] == hf_greedy(model, prompt, 35), f"{family} n-grams {ngram_len} prompt {k}"
        longest = max(longest, *per_step)
    if ngram_len > 3:  # some step accepted more than the drafter's own beams could give
        assert longest > 3


def test_lookup_beams_alone_keep_parity_in_a_batch(family):
    """``--beams 0``: no drafted beam, the tree holds the context-lookup and n-gram beams only (a row
    without a match takes a plain step's root alone), rows of mixed lengths side by side."""
    model = tiny_target(family, seed=4)
    prompts = [random_prompt(n // 3 + 1, 200 + n) * 3 for n in (2, 9, 17)]  # repeated text: lookups match
    table = build_table([hf_greedy(model, random_prompt(5, s), 30) for s in range(4)], min_n=1, max_n=4, min_count=1)
    decoder = SpeculativeDecoder(model, no_draft, [], lookup_len=6, ngrams=table, ngram_len=4)
    ids, per_step = speculative(decoder, prompts, 24)
    assert ids == [hf_greedy(model, prompt, 24) for prompt in prompts]
    assert max(per_step) > 1  # lookup beams were accepted


def test_a_table_that_knows_the_continuation_gets_long_steps_accepted(family):
    model = tiny_target(family, seed=3)
    prompt = random_prompt(6, 5)
    continuation = hf_greedy(model, prompt, 40)
    table = build_table([prompt + continuation], min_n=1, max_n=8, min_count=1)
    proposer = DrafterProposer(random_drafter(model, seed=3), 2, 2)  # at most 2 tokens a step
    ids, per_step = speculative(SpeculativeDecoder(model, proposer, [], 0, table, ngram_len=6), [prompt], 40)
    assert ids[0] == continuation
    # The drafter alone needs at least 20 steps; the n-gram beam (up to 6 a step) far fewer, even
    # though a tiny model's loops make some n-grams ambiguous.
    assert len(per_step) <= 12, per_step


@pytest.mark.parametrize("family_name", ["llama", "gemma2"])
def test_context_and_ngram_beams_in_a_batch_of_mixed_lengths(family_name):
    model = tiny_target(family_name, seed=7)
    prompts = [random_prompt(n, n) * 2 for n in (3, 9, 1, 5)]
    table = build_table([hf_greedy(model, p, 12) for p in prompts[:2]], min_n=1, max_n=3, min_count=1)
    decoder = SpeculativeDecoder(
        model, DrafterProposer(random_drafter(model, seed=7), 2, 3), [], lookup_len=5, ngrams=table, ngram_len=7
    )
    batched, _ = speculative(decoder, prompts, 25)
    for prompt, ids in zip(prompts, batched, strict=True):
        assert ids == hf_greedy(model, prompt, 25)


@pytest.mark.parametrize("tied_head", [False, True])
def test_parity_with_small_draft_vocabulary(family, tied_head):
    model = tiny_target(family, seed=1)
    drafter = random_drafter(model, seed=3, draft_vocab_size=10, exit_dim=24, num_draft_layers=1, tied_head=tied_head)
    drafter.draft_vocab.copy_(torch.randperm(VOCAB)[:10])
    drafter.attach(model.get_input_embeddings(), model.get_output_embeddings())
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 12, 3), eos_token_ids=[])  # W > K too
    prompt = random_prompt(9, 5)
    assert speculative(decoder, [prompt], 30)[0][0] == hf_greedy(model, prompt, 30)


def oracle_proposer(continuation: list[int], prompt_len: int, num_beams: int, draft_len: int):
    """Beam 0 is the target's own greedy continuation; the other beams are wrong on purpose."""
    sequence = torch.tensor(continuation + [0] * draft_len)

    def propose(hidden, last_token, positions):
        start = int(positions[0]) - prompt_len  # index of last_token in the continuation
        right = sequence[start : start + draft_len]
        assert right[0] == last_token[0]
        beams = right.repeat(num_beams, 1)
        beams[1:, 1:] = (beams[1:, 1:] + torch.arange(1, num_beams)[:, None]) % VOCAB
        return beams[None]

    propose.draft_len = draft_len
    return propose


def noisy_oracle_proposer(continuation: list[int], prompt_len: int, num_beams: int, draft_len: int, seed: int):
    """Each beam follows the greedy continuation for a random number of tokens, then goes wrong:
    partial acceptance, shared prefixes and a best beam that is not beam 0."""
    sequence = torch.tensor(continuation + [0] * draft_len)
    generator = torch.Generator().manual_seed(seed)

    def propose(hidden, last_token, positions):
        start = int(positions[0]) - prompt_len
        beams = sequence[start : start + draft_len].repeat(num_beams, 1)
        right_for = torch.randint(1, draft_len + 1, (num_beams, 1), generator=generator)
        wrong = (beams + torch.randint(1, VOCAB, beams.shape, generator=generator)) % VOCAB
        steps = torch.arange(draft_len)[None, :]
        return torch.where(steps < right_for, beams, wrong)[None]

    propose.draft_len = draft_len
    return propose


@pytest.mark.parametrize("beams,draft_len", [(1, 2), (4, 5), (6, 3)])
def test_partially_right_drafts_keep_parity(family, beams, draft_len):
    model = tiny_target(family, seed=8)
    for seed, (length, max_new) in enumerate([(3, 30), (12, 17)]):
        prompt = random_prompt(length, 100 + seed)
        continuation = hf_greedy(model, prompt, max_new + draft_len)
        proposer = noisy_oracle_proposer(continuation, len(prompt), beams, draft_len, seed)
        ids, per_step = speculative(SpeculativeDecoder(model, proposer, []), [prompt], max_new)
        assert ids[0] == continuation[:max_new]
        assert max(per_step) > 1 or draft_len == 1


@pytest.mark.parametrize("family_name", ["llama", "qwen2"])
@pytest.mark.parametrize("num_beams,draft_len", [(1, 2), (3, 5), (5, 4)])
def test_oracle_drafts_are_all_accepted(family_name, num_beams, draft_len):
    model = tiny_target(family_name, seed=2)
    prompt, max_new = random_prompt(6, 7), 40
    continuation = hf_greedy(model, prompt, max_new + draft_len)
    proposer = oracle_proposer(continuation, len(prompt), num_beams, draft_len)
    decoder = SpeculativeDecoder(model, proposer, eos_token_ids=[])
    ids, per_step = speculative(decoder, [prompt], max_new)
    assert ids[0] == continuation[:max_new]
    # Prefill emits 1; every decoding step accepts all L-1 drafts + the bonus; the last is capped.
    assert per_step[0] == 1
    assert per_step[1:-1] == [draft_len] * (len(per_step) - 2)
    assert 1 <= per_step[-1] <= draft_len


def test_eos_stops_and_nothing_after_it_is_emitted(family):
    model = tiny_target(family, seed=4)
    prompt = random_prompt(8, 11)
    free = hf_greedy(model, prompt, 30)
    eos = free[12]  # a token that greedy decoding reaches
    expected = hf_greedy(model, prompt, 30, eos=eos)
    assert expected[-1] == eos and len(expected) <= 13
    continuation = free + [0] * 8
    for proposer, lookup_len in [
        (no_draft, 0),
        (DrafterProposer(random_drafter(model, 0), 4, 5), 0),
        (DrafterProposer(random_drafter(model, 0), 4, 3), 8),
        (oracle_proposer(continuation, len(prompt), 2, 6), 0),
    ]:
        decoder = SpeculativeDecoder(model, proposer, [eos], lookup_len)
        ids, _ = speculative(decoder, [prompt], 30)
        assert ids[0] == expected


@pytest.mark.parametrize("max_new", [1, 2, 4, 5, 6, 9, 10, 11])
def test_max_new_tokens_is_exact_even_when_a_step_accepts_more(max_new):
    model = tiny_target("llama", seed=5)
    prompt = random_prompt(4, 3)
    continuation = hf_greedy(model, prompt, 40)
    decoder = SpeculativeDecoder(model, oracle_proposer(continuation, len(prompt), 2, 5), eos_token_ids=[])
    ids, _ = speculative(decoder, [prompt], max_new)
    assert ids[0] == continuation[:max_new]


def test_autoregressive_loop_is_one_token_per_step():
    model = tiny_target("llama")
    prompt = random_prompt(5, 0)
    ids, per_step = speculative(SpeculativeDecoder(model, no_draft, []), [prompt], 12)
    assert ids[0] == hf_greedy(model, prompt, 12)
    assert per_step == [1] * 12


@pytest.mark.parametrize("lookup_len", [0, 7])
@pytest.mark.parametrize("family_name", ["llama", "gemma3"])
def test_batch_of_mixed_lengths_equals_batch_of_one(family_name, lookup_len):
    model = tiny_target(family_name, seed=6)
    drafter = random_drafter(model, seed=6)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4), [], lookup_len)
    prompts = [random_prompt(n, n) for n in (3, 11, 6, 1)]
    batched, _ = speculative(decoder, prompts, 25)
    for prompt, ids in zip(prompts, batched, strict=True):
        assert ids == hf_greedy(model, prompt, 25)


WINDOWED = {  # sliding windows of 5 tokens; where a config has layer_types, full and sliding layers mixed
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=8, sliding_window=5, attn_implementation="eager"),
    "gemma3": lambda: Gemma3TextConfig(
        **COMMON, head_dim=8, sliding_window=5, layer_types=["sliding_attention", "full_attention"]
    ),
}


def windowed_target(family: str, seed: int):
    """A float64 tiny ``family`` model whose sliding layers see 5 tokens."""
    return tiny_target(family, seed, config=WINDOWED[family]())


@pytest.mark.parametrize("lookup_len", [0, 6])
@pytest.mark.parametrize("family_name", sorted(WINDOWED))
def test_sliding_window_layers_keep_parity_far_past_the_window(family_name, lookup_len):
    """Prompts and outputs many windows long, in a batch of mixed lengths: a tree token that saw
    past its layer's window (or one that lost sight of a key inside it) changes the output."""
    model = windowed_target(family_name, seed=5)
    kinds = set(getattr(model.config, "layer_types", None) or ["sliding_attention"])
    assert "sliding_attention" in kinds and (family_name == "mistral" or len(kinds) == 2)
    drafter = random_drafter(model, seed=5)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4, tree_nodes=5), [], lookup_len)
    prompts = [random_prompt(n, n) for n in (23, 4, 12)]
    batched, per_step = speculative(decoder, prompts, 30)
    for prompt, ids in zip(prompts, batched, strict=True):
        assert ids == hf_greedy(model, prompt, 30), family_name
    assert len(per_step) < 31  # the loop ran (and accepted drafts at times); parity is what counts


def test_the_context_limit_of_a_windowed_model_is_its_real_one():
    model = windowed_target("gemma3", seed=1)
    decoder = SpeculativeDecoder(model, no_draft, [])
    assert decoder.max_positions == model.config.max_position_embeddings == 256


def test_a_growing_lookup_beam_stops_at_the_context_limit():
    model = tiny_target("llama", seed=9)
    limit = model.config.max_position_embeddings
    prompt = random_prompt(6, 2) * 5  # a loop the lookup beam copies, growing step by step
    decoder = SpeculativeDecoder(model, DrafterProposer(random_drafter(model, seed=2), 2, 3), [], lookup_len=4)
    ids, per_step = speculative(decoder, [prompt], 2 * limit)
    # It stops for the context (conservatively: with room for one more full step), not the budget.
    assert limit - 40 <= len(prompt) + len(ids[0]) <= limit
    assert ids[0] == hf_greedy(model, prompt, len(ids[0]))
    assert max(per_step) > 4  # the lookup beam grew past its first length
