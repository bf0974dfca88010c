"""Teacher-forced replay (``SpeculativeDecoder.replay``): along the decoder's own greedy output it
takes exactly the steps that decoding took (float64), and along any other text it counts what the
drafts would have had accepted there."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_target
from test_parity import hf_greedy, random_drafter, random_prompt, speculative

from redrafter.decode import DrafterProposer, SpeculativeDecoder
from redrafter.models import decoder_of
from redrafter.ngrams import build_table


def hidden_keyed_proposer(model, prompt: list[int], continuation: list[int], num_beams: int, draft_len: int):
    """Drafts read off the hidden state alone: the position whose target hidden state it is (the
    nearest along ``prompt + continuation``) says where in the continuation the beams start; each
    beam is right for a number of tokens drawn from that position (so the same in decode and replay).
    A replay that passed the hidden state of another position would draft another text."""
    sequence = prompt + continuation
    with torch.no_grad():
        states = decoder_of(model)(input_ids=torch.tensor([sequence]), use_cache=False).last_hidden_state[0]
    padded = torch.tensor(sequence + [0] * draft_len)

    def propose(hidden, last_token, positions):
        at = int(torch.cdist(hidden, states).argmin()) + 1  # the position of last_token
        generator = torch.Generator().manual_seed(at)
        beams = padded[at : at + draft_len].repeat(num_beams, 1)
        right_for = torch.randint(1, draft_len + 1, (num_beams, 1), generator=generator)
        wrong = (beams + torch.randint(1, VOCAB, beams.shape, generator=generator)) % VOCAB
        return torch.where(torch.arange(draft_len)[None, :] < right_for, beams, wrong)[None]

    propose.draft_len = draft_len
    return propose


@pytest.mark.parametrize("lookup_len,ngram_len", [(0, 0), (5, 4)])
def test_replay_along_the_output_takes_the_steps_decoding_took(family, lookup_len, ngram_len):
    model = tiny_target(family, seed=4)
    corpus = [hf_greedy(model, random_prompt(5, s), 25) for s in range(4)]
    table = build_table(corpus, min_n=1, max_n=4, min_count=1)
    for seed, (length, max_new) in enumerate([(4, 40), (11, 23)]):
        prompt = random_prompt(length, 200 + seed)
        continuation = hf_greedy(model, prompt, max_new + 8)
        proposer = hidden_keyed_proposer(model, prompt, continuation, 3, 4)
        decoder = SpeculativeDecoder(model, proposer, [], lookup_len, table, ngram_len)
        ids, per_step = speculative(decoder, [prompt], max_new)
        assert ids[0] == continuation[:max_new]
        assert max(per_step) > 1
        assert decoder.replay(prompt, ids[0]) == per_step, f"{family} prompt {seed}"


def test_replay_with_a_drafter_a_dynamic_tree_and_lookup_beams(family):
    model = tiny_target(family, seed=6)
    table = build_table([hf_greedy(model, random_prompt(4, s), 20) for s in range(3)], min_n=1, max_n=3, min_count=1)
    proposer = DrafterProposer(random_drafter(model, seed=5), 4, 4, tree_nodes=5)
    decoder = SpeculativeDecoder(model, proposer, [], lookup_len=6, ngrams=table, ngram_len=5)
    prompt = random_prompt(3, 77) * 3
    ids, per_step = speculative(decoder, [prompt], 45)
    assert max(per_step) > 1
    assert decoder.replay(prompt, ids[0]) == per_step


def test_replay_along_another_text_counts_its_own_acceptance():
    model = tiny_target("llama", seed=4)
    prompt = random_prompt(6, 300)
    continuation = hf_greedy(model, prompt, 30)
    proposer = hidden_keyed_proposer(model, prompt, continuation, 2, 5)
    decoder = SpeculativeDecoder(model, proposer, [])
    # A text the drafts never follow: every step emits one token.
    other = [(t + 1) % VOCAB for t in continuation]
    assert decoder.replay(prompt, other) == [1] * len(other)
    # A shorter output (as after EOS or a token budget): the counts stop at its end.
    counts = decoder.replay(prompt, continuation[:13])
    assert sum(counts) == 13 and max(counts) > 1
    assert decoder.replay(prompt, []) == []
