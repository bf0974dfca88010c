"""Multi-layer fusion (EAGLE-3's): a drafter that reads the outputs of chosen target layers beside
the final hidden state. The features are the layers' real outputs on every forward path, fusion
keeps decoding lossless, a widened drafter starts as it was, and training and its cache carry them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COMMON, HIDDEN, VOCAB, tiny_target
from test_parity import hf_greedy, random_prompt, speculative
from test_train import CONFIG
from test_train import setup as setup  # noqa: F401  (the tiny corpus fixture)
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

from redrafter.beam_search import beam_search
from redrafter.decode import DrafterProposer, SpeculativeDecoder
from redrafter.drafter import DrafterConfig, DrafterError, RecurrentDrafter
from redrafter.export import check_export
from redrafter.hidden_cache import HiddenStates
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import decoder_features
from redrafter.train import TrainConfig, Trainer

LAYERS = [0, 2]
DEEP = {
    "llama": lambda: LlamaConfig(**{**COMMON, "num_hidden_layers": 4}),
    "qwen2": lambda: Qwen2Config(**{**COMMON, "num_hidden_layers": 4}),
    "gemma3": lambda: Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=8, sliding_window=512),
}


def deep_target(family: str, seed: int = 0):
    return tiny_target(family, seed, config=DEEP[family]())


def fused_drafter(model, seed: int, layers=LAYERS) -> RecurrentDrafter:
    """A random drafter whose fusion is random too (not the identity it starts from)."""
    torch.manual_seed(seed)
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, fused_layers=layers))
    with torch.no_grad():
        drafter.fuse.weight.normal_(0, 0.2)
    return drafter.to(torch.float64).attach(model.get_input_embeddings()).eval()


@pytest.mark.parametrize("family", sorted(DEEP))
def test_features_are_the_final_state_and_the_layers_outputs(family):
    model = deep_target(family)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    features = decoder_features(model.model, tuple(LAYERS), input_ids=ids)
    states = model.model(input_ids=ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ...]
    assert features.shape == (2, 9, 3 * HIDDEN)
    assert torch.equal(features[..., :HIDDEN], states[-1])
    assert torch.equal(features[..., HIDDEN : 2 * HIDDEN], states[1])
    assert torch.equal(features[..., 2 * HIDDEN :], states[3])
    assert torch.equal(decoder_features(model.model, (), input_ids=ids), states[-1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_lean_forward_gives_the_same_features(family):
    """The lean decoder's captured layers equal transformers' (float64), prefill then a tree step."""
    model = deep_target(family)
    lean, reference = target_forward(model, lean=True), target_forward(model, lean=False)
    assert lean is not reference
    caches = [TreeKVCache(4, capacity=32), TreeKVCache(4, capacity=32)]
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6)[None]
    mask = torch.full((6, 6), -torch.inf, dtype=torch.float64).triu(1)[None, None]
    outs = [f(ids, positions, mask, cache, (0, 2)) for f, cache in zip((lean, reference), caches, strict=True)]
    assert outs[0].shape == (1, 6, 3 * HIDDEN)
    assert (outs[0] - outs[1]).abs().max() < 1e-12
    tree_ids, tree_positions = torch.tensor([[5, 7, 9]]), torch.tensor([[6, 7, 7]])  # a root and two children
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    tree_mask = torch.zeros(1, 1, 3, 9, dtype=torch.float64)
    tree_mask[..., 6:] = torch.where(allowed, 0.0, -torch.inf)
    outs = [f(tree_ids, tree_positions, tree_mask, c, (2,)) for f, c in zip((lean, reference), caches, strict=True)]
    assert outs[0].shape == (1, 3, 2 * HIDDEN)
    assert (outs[0] - outs[1]).abs().max() < 1e-12


@pytest.mark.parametrize("family", sorted(DEEP))
@pytest.mark.parametrize("lookup_len", [0, 6])
def test_a_fused_drafter_keeps_greedy_parity_and_replay(family, lookup_len):
    model = deep_target(family, seed=3)
    drafter = fused_drafter(model, seed=4)
    decoder = SpeculativeDecoder(model, DrafterProposer(drafter, 3, 4), eos_token_ids=[], lookup_len=lookup_len)
    assert decoder.layers == (0, 2)
    for seed, (length, max_new) in enumerate([(3, 24), (12, 17)]):
        prompt = random_prompt(length, seed)
        ids, per_step = speculative(decoder, [prompt], max_new)
        assert ids[0] == hf_greedy(model, prompt, max_new), f"{family} prompt {seed}"
        # Replay drafts from the features of one full forward: the same drafts, the same steps.
        assert decoder.replay(prompt, ids[0]) == per_step


def test_a_widened_drafter_drafts_as_before_and_round_trips(tmp_path):
    model = deep_target("llama")
    torch.manual_seed(5)
    plain = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, tied_head=True, draft_vocab_size=40))
    plain = plain.to(torch.float64).attach(model.get_input_embeddings())
    wide = plain.with_fused_layers(LAYERS)
    assert wide.config.fused_layers == LAYERS and plain.config.fused_layers is None
    assert wide.target_layers == (0, 2) and wide.feature_size == 3 * HIDDEN
    features = torch.randn(4, 3 * HIDDEN, dtype=torch.float64)
    last = torch.randint(0, VOCAB, (4,))
    assert torch.equal(beam_search(wide, features, last, 3, 4), beam_search(plain, features[:, :HIDDEN], last, 3, 4))
    tokens = torch.randint(0, VOCAB, (4, 1, 3))
    assert torch.equal(wide(features[:, None], tokens), plain(features[:, None, :HIDDEN], tokens))
    with torch.no_grad():
        wide.fuse.weight[:, HIDDEN:].normal_(0, 0.5)  # the other layers now count
    assert not torch.equal(wide(features[:, None], tokens[:, :1]), plain(features[:, None, :HIDDEN], tokens[:, :1]))
    wide.save_pretrained(tmp_path / "wide")
    assert json.loads((tmp_path / "wide" / "config.json").read_text())["fused_layers"] == LAYERS
    loaded = RecurrentDrafter.from_pretrained(tmp_path / "wide", model.get_input_embeddings(), dtype=torch.float64)
    assert torch.equal(loaded.fuse.weight, wide.fuse.weight)
    assert torch.equal(loaded(features[:, None], tokens[:, :1]), wide(features[:, None], tokens[:, :1]))
    with pytest.raises(DrafterError, match="already fuses"):
        wide.with_fused_layers([1])


def test_fused_layers_that_do_not_fit_are_refused(tmp_path):
    drafter = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, fused_layers=[0, 3]))
    drafter.check_fits(HIDDEN, VOCAB, 5)
    with pytest.raises(DrafterError, match=r"fuses target layers \[0, 3\], but the target has 4 layers"):
        drafter.check_fits(HIDDEN, VOCAB, 4)
    for bad in ([], [-1], [1.5]):
        with pytest.raises(DrafterError, match="fused_layers must be layer indices"):
            DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, fused_layers=bad)
    for fmt in ("apple", "trtllm"):
        with pytest.raises(DrafterError, match="fuses target layers .* cannot be exported"):
            check_export(drafter, fmt, tmp_path / fmt, False, True, True)


def test_training_reads_the_layers_from_the_cache_as_on_the_fly(setup, tmp_path):  # noqa: F811
    """A widened drafter trains to the same weights from the hidden-state cache as from features
    computed on the fly; the cache holds the layers' outputs, and a cache of other layers is rebuilt."""
    model, pairs = setup
    config = TrainConfig(steps=5, draft_vocab=40, **CONFIG)
    torch.manual_seed(0)
    start = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, draft_vocab_size=40))
    runs = []
    for name, cache in (("fly", None), ("cached", tmp_path / "cache")):
        drafter = RecurrentDrafter(start.config)
        drafter.load_state_dict(start.state_dict())
        trainer = Trainer(model, config, pairs, tmp_path / name, drafter.with_fused_layers([0]), False, cache)
        assert trainer.layers == (0,)
        runs.append(trainer.train())
    states = HiddenStates(tmp_path / "cache", pairs, model, progress=False, layers=(0,))
    prompt, response = pairs[7]
    expected = decoder_features(model.model, (0,), input_ids=torch.tensor([prompt + response]))[0]
    assert torch.allclose(states.batch([7])[0], expected, atol=1e-5)
    for (name, a), (_, b) in zip(runs[0].state_dict().items(), runs[1].state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert not torch.equal(runs[1].fuse.weight[:, HIDDEN:], torch.zeros(HIDDEN, HIDDEN))  # the layer was used
    final_only = HiddenStates(tmp_path / "cache", pairs, model, progress=False)
    assert final_only.width == HIDDEN * 4  # rebuilt for the final state alone (float32)
    assert torch.allclose(final_only.batch([7])[0], expected[:, :HIDDEN], atol=1e-5)
