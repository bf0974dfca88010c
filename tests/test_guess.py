"""The drafter's guess (redrafter.guess, kernels/drafter.c): the kernel against the same drafter in
PyTorch, the guess joining the confidence tree's root, and lossless greedy decoding with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_target, word_tokenizer
from test_confidence import COSTS, grid_table
from test_fused_layer import w4a8_target
from test_parity import hf_greedy, random_drafter, random_prompt, speculative
from torch import nn

from redrafter.api import ReDrafter
from redrafter.bench import variant
from redrafter.confidence import GRID_SHAPE, ConfidenceTree, fit_confidence
from redrafter.decode import SpeculativeDecoder, no_draft
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.errors import RedrafterError
from redrafter.guess import DrafterGuess, fused_guess_refusal
from redrafter.ngrams import build_table
from redrafter.quant import quantization_refusal, quantize_drafter

needs_w4a8 = pytest.mark.skipif(
    quantization_refusal("cpu", torch.bfloat16, "w4a8") is not None,
    reason=str(quantization_refusal("cpu", torch.bfloat16, "w4a8")),
)

SHAPES = {
    "tied": dict(draft_vocab_size=48, tied_head=True),
    "untied, projected": dict(exit_dim=96, num_draft_layers=1),
    "no rnn": dict(rnn=False, tied_head=True, num_draft_layers=3),
    "trtllm cell": dict(rnn_cell="trtllm"),
}


def w4a8_drafter(shape: dict, dtype: torch.dtype, seed: int = 0) -> tuple[RecurrentDrafter, nn.Embedding]:
    """A random drafter of ``shape`` over a random embedding table, and its w4a8 copy's embedding table."""
    torch.manual_seed(seed)
    embedding = nn.Embedding(VOCAB, HIDDEN).to(dtype)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **shape))
    for parameter in drafter.parameters():
        nn.init.normal_(parameter, std=0.1)  # probabilities well inside (0, 1)
    drafter = drafter.to(dtype).attach(embedding).eval()
    return quantize_drafter(drafter, "w4a8"), embedding


@needs_w4a8
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_kernel_guesses_what_the_drafter_guesses_in_pytorch(shape):
    """The same tokens, and in float32 the same probabilities (up to an exponential's and a sum's last
    bits). With bfloat16 activations the kernel stays in float32 where PyTorch rounds after every
    operation (the logits too: a logit of 10 moves by up to 0.04), so the probabilities are within 10%."""
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        drafter, _ = w4a8_drafter(SHAPES[shape], dtype, seed=len(shape))
        fused = DrafterGuess(drafter)
        assert fused.refusal is None and fused.struct is not None
        assert drafter.dtype == dtype  # the activations' (not the w4a8 scales' float16)
        hidden = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
        last = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(2))
        tokens, probabilities = fused(hidden, last)
        unfused = DrafterGuess(drafter)
        unfused.struct = None  # the same drafter through its PyTorch modules
        expected_tokens, expected = unfused(hidden, last)
        assert probabilities.dtype == torch.float32 and tokens.dtype == torch.long
        assert torch.all((probabilities > 0) & (probabilities <= 1))
        assert float(probabilities.min()) < 0.9  # not all saturated: the comparison below means something
        torch.testing.assert_close(probabilities, expected, rtol=tolerance, atol=1e-6)
        assert torch.equal(tokens, expected_tokens), (shape, dtype)
        assert set(tokens.tolist()) <= set(drafter.draft_vocab.tolist())  # target ids


@needs_w4a8
def test_each_row_is_guessed_alone():
    """Rows do not change each other's guess (w4a8's products are batch invariant)."""
    drafter, _ = w4a8_drafter(SHAPES["tied"], torch.bfloat16)
    guess = DrafterGuess(drafter)
    hidden = torch.randn(5, HIDDEN).to(torch.bfloat16)
    last = torch.arange(5) + 3
    tokens, probabilities = guess(hidden, last)
    for row in range(5):
        one_token, one = guess(hidden[row : row + 1], last[row : row + 1])
        assert int(one_token) == int(tokens[row]) and float(one) == float(probabilities[row])


@needs_w4a8
def test_an_embedding_module_other_than_a_plain_table_is_gathered_through_it():
    """A scaled embedding (Gemma's) is not read in place: its module gives the rows, the same guess."""
    drafter, embedding = w4a8_drafter(SHAPES["tied"], torch.float32)
    guess = DrafterGuess(drafter)
    assert guess.table is not None and guess.table.data_ptr() == embedding.weight.data_ptr()  # in place
    hidden, last = torch.randn(3, HIDDEN), torch.tensor([5, 9, 5])
    tokens, probabilities = guess(hidden, last)
    guess.table = None  # as for a module other than nn.Embedding
    gathered_tokens, gathered = guess(hidden, last)
    assert torch.equal(tokens, gathered_tokens) and torch.equal(probabilities, gathered)

    class Scaled(nn.Embedding):  # as Gemma's: the rows times a constant
        def forward(self, ids):
            return super().forward(ids) * 3.0

    scaled = Scaled(VOCAB, HIDDEN)
    scaled.weight = embedding.weight
    drafter._embedding = (scaled,)
    fused = DrafterGuess(drafter)
    assert fused.table is None
    unfused = DrafterGuess(drafter)
    unfused.struct = None
    scaled_tokens, scaled_probabilities = fused(hidden, last)
    expected_tokens, expected = unfused(hidden, last)
    assert torch.equal(scaled_tokens, expected_tokens)
    torch.testing.assert_close(scaled_probabilities, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(scaled_probabilities, probabilities)  # the scale reached the guess


def test_where_the_kernel_cannot_run_the_guess_runs_in_pytorch():
    model = tiny_target("llama", seed=1)
    drafter = random_drafter(model, seed=1)  # float64 weights
    assert "w4a8" in fused_guess_refusal(drafter)
    guess = DrafterGuess(drafter)
    hidden = torch.randn(3, HIDDEN, dtype=torch.float64)
    tokens, probabilities = guess(hidden, torch.tensor([4, 5, 6]))
    logits = drafter.head(hidden, drafter.rnn_step(None, drafter.embed(torch.tensor([4, 5, 6])))).float()
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(probabilities, logits.softmax(-1).max(-1).values)
    fused = random_drafter(model, seed=1).with_fused_layers([0])
    assert "fuses target layers" in fused_guess_refusal(fused)


def test_the_guess_joins_the_root_at_its_probability_or_the_lookups_larger():
    table = grid_table(3)
    table.confidence[:] = 0.4  # every lookup guess: 0.4
    tree = ConfidenceTree([[1, 2, 3, 1, 2]], table, COSTS, max_nodes=6)
    lookups = dict(tree.guesses(0))
    assert lookups and all(p == pytest.approx(0.4) for p in lookups.values())
    new = next(t for t in range(5, VOCAB) if t not in lookups)
    assert dict(tree.guesses(0, (), (new, 0.9))) == lookups | {new: pytest.approx(0.9)}
    known = next(iter(lookups))
    assert dict(tree.guesses(0, (), (known, 0.7)))[known] == pytest.approx(0.7)  # the larger of the two
    assert dict(tree.guesses(0, (), (known, 0.1)))[known] == pytest.approx(0.4)
    root = torch.tensor([[[2]]])
    sure = tree.beams(root, guesses=[(new, 0.95)])
    assert new in sure[0, :, 1].tolist()  # a likely guess gets a node at depth 1
    doubtful = tree.beams(root, guesses=[(new, 0.01)])
    assert new not in doubtful[0, :, 1:].flatten().tolist()  # an unlikely one does not pay for its node
    assert torch.equal(doubtful, tree.beams(root))


def grid_drafter(model, seed: int):
    """A random float64 drafter with an n-gram table and a fitted confidence grid, for ``model``."""
    drafter = random_drafter(model, seed=seed)
    corpus = [hf_greedy(model, random_prompt(5, s), 30) for s in range(4)]
    drafter.ngrams = build_table(corpus, min_n=1, max_n=4, min_count=1)
    drafter.ngrams.confidence = fit_confidence(
        drafter.ngrams, [(random_prompt(4, 77), hf_greedy(model, random_prompt(4, 77), 20))]
    )
    return drafter


class SureGuess:
    """The drafter's guess, claimed right 90% of the time: it joins every tree (mostly wrong, a random
    drafter's), and a spy counts the rows it guessed for; asked for where the lookups' root is below
    ``below``."""

    def __init__(self, drafter: RecurrentDrafter, below: float = 2.0) -> None:
        self.guess, self.rows, self.below = DrafterGuess(drafter), 0, below

    def __call__(self, hidden: torch.Tensor, last_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, probabilities = self.guess(hidden, last_token)
        self.rows += len(tokens)
        return tokens, torch.full_like(probabilities, 0.9)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_greedy_decoding_with_the_guess_equals_plain_greedy(family):
    model = tiny_target(family, seed=5)
    drafter = grid_drafter(model, seed=5)
    prompts = [random_prompt(n // 3 + 1, 300 + n) * 3 for n in (2, 9, 17)]
    expected = [hf_greedy(model, prompt, 24) for prompt in prompts]
    for guess in (DrafterGuess(drafter), SureGuess(drafter)):
        decoder = SpeculativeDecoder(
            model, no_draft, [], ngrams=drafter.ngrams, lookup_nodes=8, node_costs=COSTS, guess=guess
        )
        ids, _ = speculative(decoder, prompts, 24)
        assert ids == expected
    assert guess.rows > 30  # every step of every row guessed
    sure_lookups = SureGuess(drafter, below=0.0)  # no lookup guess is below 0: never asked
    decoder.guess = sure_lookups
    assert speculative(decoder, prompts, 24)[0] == expected and sure_lookups.rows == 0
    tokens = expected[0]
    assert decoder.replay(prompts[0], tokens) and sum(decoder.replay(prompts[0], tokens)) == len(tokens)


@needs_w4a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_decoding_with_the_kernel_guess_equals_plain_decoding(dtype):
    """The default path: a w4a8 target on fused steps, the w4a8 drafter's guess from the kernel."""
    model = w4a8_target("llama", dtype, seed=2)
    torch.manual_seed(5)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=model.config.hidden_size, vocab_size=VOCAB)).to(dtype)
    drafter.attach(model.get_input_embeddings()).eval()
    drafter.ngrams = build_table([torch.randint(2, VOCAB, (300,)).tolist()], min_n=1, max_n=3, min_count=1)
    drafter.ngrams.confidence = np.full(GRID_SHAPE, 0.5, dtype=np.float32)
    engine = ReDrafter(
        model, word_tokenizer(), drafter, num_beams=0, lookup_nodes=6, drafter_guess=True, drafter_weights="w4a8"
    )
    assert engine.decoder.guess.struct is not None  # the kernel's
    plain = SpeculativeDecoder(model, no_draft, [])
    prompts = [random_prompt(n // 2 + 1, n) * 2 for n in (1, 6, 15)]
    assert speculative(engine.decoder, prompts, 30)[0] == speculative(plain, prompts, 30)[0]


def test_the_api_takes_the_guess_only_with_a_confidence_tree_and_no_beams():
    model = tiny_target("llama", seed=2)
    drafter = grid_drafter(model, seed=2)
    with pytest.raises(RedrafterError, match="--drafter-guess .* needs --beams 0 and --lookup-nodes"):
        ReDrafter(model, word_tokenizer(), drafter, num_beams=2, lookup_nodes=4, drafter_guess=True)
    with pytest.raises(RedrafterError, match="needs --beams 0 and --lookup-nodes"):
        ReDrafter(model, word_tokenizer(), drafter, num_beams=0, lookup_nodes=0, lookup_len=3, drafter_guess=True)
    engine = ReDrafter(model, word_tokenizer(), drafter, num_beams=0, lookup_nodes=4, drafter_guess=True)
    assert isinstance(engine.decoder.guess, DrafterGuess)
    assert variant(engine, lookup_nodes=0, lookup_len=3).decoder.guess is None  # a bench variant drops it
    assert variant(engine, drafter_guess=0).decoder.guess is None
    assert ReDrafter(model, word_tokenizer(), None, drafter_guess=True).decoder.guess is None  # plain stays plain


def test_the_guess_is_asked_only_for_rows_whose_lookups_are_unsure():
    table = grid_table(3)
    table.confidence[:] = 0.9  # every lookup guess: 0.9
    tree = ConfidenceTree([[1, 2, 3, 1, 2], [50, 51, 52]], table, COSTS, max_nodes=6)
    assert tree.root_confidence(0) == pytest.approx(0.9) and tree.root_confidence(1) == 0.0  # 52: never seen
    asked = []

    def guess(hidden, last_token):
        asked.append(last_token.tolist())
        return torch.full_like(last_token, 60), torch.full(last_token.shape, 0.8)

    guess.below = 0.5
    model = tiny_target("llama", seed=1)
    decoder = SpeculativeDecoder(model, no_draft, [], ngrams=table, lookup_nodes=6, node_costs=COSTS, guess=guess)
    hidden = torch.zeros(2, HIDDEN, dtype=torch.float64)
    beams = decoder._lookup_beams(tree, torch.tensor([[[2]], [[52]]]), hidden, torch.tensor([2, 52]), decoder.trees[0])
    assert asked == [[52]]  # row 0's lookups are sure enough
    assert 60 in beams[1, :, 1].tolist() and 60 not in beams[0].flatten().tolist()


def test_root_guesses_are_looked_up_again_once_a_row_grows_and_follow_its_row():
    table = grid_table(4)
    prompts = [[1, 2, 3, 1, 2], [3, 4, 3, 4, 3]]
    tree = ConfidenceTree(prompts, table, COSTS, max_nodes=6)
    before = [tree.guesses(row) for row in range(2)]
    tree.extend(0, [3, 1])
    fresh = ConfidenceTree([prompts[0] + [3, 1], prompts[1]], table, COSTS, max_nodes=6)
    assert tree.guesses(0) == fresh.guesses(0) and tree.guesses(1) == before[1]
    tree.select([1])
    assert tree.guesses(0) == before[1]
    tree.merge(fresh)
    assert tree.guesses(1) == fresh.guesses(0)
