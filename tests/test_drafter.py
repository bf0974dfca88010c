"""The drafter module: equations, beam search, save/load in the reference layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_target
from safetensors.torch import load_file, save_file

from redrafter.beam_search import beam_search
from redrafter.drafter import DrafterConfig, DrafterError, RecurrentDrafter
from redrafter.tree import PAD


def make_drafter(**kwargs) -> RecurrentDrafter:
    torch.manual_seed(0)
    model = tiny_target("llama")
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **kwargs)
    return RecurrentDrafter(config).to(torch.float64).attach(model.get_input_embeddings())


def test_reference_tensor_names_and_shapes(tmp_path):
    drafter = make_drafter(exit_dim=48, num_draft_layers=3, draft_vocab_size=20)
    drafter.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expected = {
        "rnn_w.weight": (HIDDEN, HIDDEN),
        "rnn_u.weight": (HIDDEN, HIDDEN),
        "rnn_u.bias": (HIDDEN,),
        "input_proj.weight": (48, 2 * HIDDEN),
        "input_proj.bias": (48,),
        "lm_head.0.linear.weight": (48, 48),
        "lm_head.0.linear.bias": (48,),
        "lm_head.1.linear.weight": (48, 48),
        "lm_head.1.linear.bias": (48,),
        "lm_head.2.linear.weight": (48, 48),
        "lm_head.2.linear.bias": (48,),
        "lm_head.3.weight": (20, 48),
        "draft_vocab": (20,),
    }
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert (config["hidden_size"], config["vocab_size"], config["exit_dim"]) == (HIDDEN, VOCAB, 48)
    assert (config["num_draft_layers"], config["rnn"], config["draft_vocab_size"]) == (3, True, 20)


def test_round_trip_keeps_weights_and_draft_vocabulary(tmp_path):
    drafter = make_drafter(draft_vocab_size=12)
    drafter.draft_vocab.copy_(torch.randperm(VOCAB)[:12])
    drafter.save_pretrained(tmp_path)
    loaded = RecurrentDrafter.from_pretrained(tmp_path, drafter._embedding[0], dtype=torch.float64)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    hidden, token = torch.randn(3, HIDDEN, dtype=torch.float64), torch.tensor([1, 2, 3])
    assert torch.equal(beam_search(drafter, hidden, token, 4, 4), beam_search(loaded, hidden, token, 4, 4))
    assert set(beam_search(loaded, hidden, token, 4, 4)[:, :, 1:].flatten().tolist()) <= set(
        drafter.draft_vocab.tolist()
    )


def test_reference_checkpoint_without_draft_vocab_and_with_lm_heads_prefix(tmp_path):
    drafter = make_drafter()
    state = {k.replace("lm_head.", "lm_heads."): v for k, v in drafter.state_dict().items() if k != "draft_vocab"}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    config = {
        "model_type": "recurrent_drafting_drafter",
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        "exit_dim": 2 * HIDDEN,
        "num_draft_layers": 2,
        "rnn": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = RecurrentDrafter.from_pretrained(tmp_path, dtype=torch.float64)
    assert torch.equal(loaded.draft_vocab, torch.arange(VOCAB))
    assert torch.equal(loaded.lm_head[2].weight, drafter.lm_head[2].weight)


def test_equations():
    drafter = make_drafter()
    h, g = torch.randn(2, HIDDEN, dtype=torch.float64), torch.tensor([4, 5])
    e = drafter.embed(g)
    s1 = torch.nn.functional.silu(e @ drafter.rnn_w.weight.T + drafter.rnn_u.bias)  # s_0 = 0
    assert torch.allclose(drafter.rnn_step(torch.zeros_like(h), e), s1)
    assert torch.equal(drafter.rnn_step(None, e), drafter.rnn_step(torch.zeros_like(h), e))  # s_0 = 0, no product
    x = torch.cat([h, s1], dim=-1)
    for block in drafter.lm_head[:-1]:
        x = x + torch.nn.functional.silu(block.linear(x))
    assert torch.allclose(drafter.head(h, s1), x @ drafter.lm_head[-1].weight.T)
    # Teacher forcing gives the same logits as stepping by hand.
    logits = drafter(h[:, None], torch.tensor([[[4, 7]], [[5, 8]]]))
    s2 = drafter.rnn_step(s1, drafter.embed(torch.tensor([7, 8])))
    assert torch.allclose(logits[:, 0, 0], drafter.head(h, s1))
    assert torch.allclose(logits[:, 0, 1], drafter.head(h, s2))


def test_trtllm_cell_by_hand_and_it_drafts_differently(tmp_path):
    """TensorRT-LLM's recurrence: s_1 = W e_1 (no bias, no SiLU), then s_i = W e_i + U s_{i-1} + b."""
    reference = make_drafter()
    trtllm = make_drafter(rnn_cell="trtllm")  # the same weights (the same seed)
    e1, e2 = reference.embed(torch.tensor([4, 5])), reference.embed(torch.tensor([7, 8]))
    w, u, b = reference.rnn_w.weight, reference.rnn_u.weight, reference.rnn_u.bias
    s1 = e1 @ w.T
    assert torch.allclose(trtllm.rnn_step(None, e1), s1)
    assert torch.allclose(trtllm.rnn_step(s1, e2), e2 @ w.T + s1 @ u.T + b)
    assert torch.allclose(reference.rnn_step(None, e1), torch.nn.functional.silu(e1 @ w.T + b))
    h = torch.randn(2, HIDDEN, dtype=torch.float64)
    teacher = trtllm(h[:, None], torch.tensor([[[4, 7]], [[5, 8]]]))  # training runs the same cell
    assert torch.allclose(teacher[:, 0, 1], trtllm.head(h, trtllm.rnn_step(s1, e2)))
    # The same weights draft other beams under the other cell.
    hidden, last = torch.randn(16, HIDDEN, dtype=torch.float64), torch.randint(0, VOCAB, (16,))
    assert not torch.equal(beam_search(reference, hidden, last, 3, 4), beam_search(trtllm, hidden, last, 3, 4))
    # The cell is saved; a folder without it is a reference drafter; a bad one is refused in one line.
    trtllm.save_pretrained(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["rnn_cell"] == "trtllm"
    assert RecurrentDrafter.from_pretrained(tmp_path / "t").config.rnn_cell == "trtllm"
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    del config["rnn_cell"]
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    assert RecurrentDrafter.from_pretrained(tmp_path / "t").config.rnn_cell == "reference"
    (tmp_path / "t" / "config.json").write_text(json.dumps(config | {"rnn_cell": "gru"}))
    with pytest.raises(DrafterError, match="rnn_cell is 'gru'; choose one of reference, trtllm"):
        RecurrentDrafter.from_pretrained(tmp_path / "t")


@torch.no_grad()
def test_beam_search_finds_the_best_beams_exhaustively():
    drafter = make_drafter(draft_vocab_size=6)
    drafter.draft_vocab.copy_(torch.tensor([3, 9, 14, 20, 33, 41]))
    hidden, token = torch.randn(1, HIDDEN, dtype=torch.float64), torch.tensor([7])
    beams = beam_search(drafter, hidden, token, num_beams=36, draft_len=3)  # W = K^2: search is exhaustive
    scores = {}
    s1 = drafter.rnn_step(torch.zeros_like(hidden), drafter.embed(token))
    lp1 = drafter.head(hidden, s1).log_softmax(-1)[0]
    for a in range(6):
        s2 = drafter.rnn_step(s1, drafter.embed(drafter.draft_vocab[a : a + 1]))
        lp2 = drafter.head(hidden, s2).log_softmax(-1)[0]
        for b in range(6):
            scores[(int(drafter.draft_vocab[a]), int(drafter.draft_vocab[b]))] = float(lp1[a] + lp2[b])
    best = sorted(scores, key=scores.get, reverse=True)
    assert [tuple(b) for b in beams[0, :, 1:].tolist()] == best
    assert (beams[0, :, 0] == 7).all()


@torch.no_grad()
@pytest.mark.parametrize("num_beams,draft_len,tree_nodes", [(1, 4, 3), (3, 2, 2), (4, 5, 7), (4, 5, 16), (8, 3, 99)])
def test_dynamic_tree_keeps_the_most_probable_prefixes_of_every_depth(num_beams, draft_len, tree_nodes):
    drafter = make_drafter(draft_vocab_size=12)
    hidden, token = torch.randn(3, HIDDEN, dtype=torch.float64), torch.tensor([7, 1, 30])
    beams = beam_search(drafter, hidden, token, num_beams, draft_len, tree_nodes=tree_nodes)
    kept = min(tree_nodes, num_beams * (draft_len - 1))
    assert beams.shape == (3, kept, draft_len)
    # The pool: the W prefixes beam search holds after each step (a shorter search's final beams).
    pool = [beam_search(drafter, hidden, token, num_beams, length + 1) for length in range(1, draft_len)]

    def score(row: int, prefix: list[int]) -> float:
        """The drafter's cumulative log-probability of ``prefix`` (root first), recomputed."""
        state, total = torch.zeros(1, HIDDEN, dtype=torch.float64), 0.0
        for previous, token_id in zip(prefix[:-1], prefix[1:], strict=True):
            state = drafter.rnn_step(state, drafter.embed(torch.tensor([previous])))
            logprobs = drafter.head(hidden[row : row + 1], state).log_softmax(-1)[0]
            total += float(logprobs[(drafter.draft_vocab == token_id).nonzero()[0, 0]])
        return total

    for row in range(3):
        chosen = [[t for t in beam if t != PAD] for beam in beams[row].tolist()]
        candidates = [beam for block in pool for beam in block[row].tolist()]
        assert all(beam in candidates for beam in chosen)
        assert len({tuple(beam) for beam in chosen}) == kept  # distinct prefixes, so 1 + kept tree nodes
        scores = [score(row, beam) for beam in chosen]
        assert scores == sorted(scores, reverse=True)  # most probable first
        left_out = [score(row, beam) for beam in candidates if beam not in chosen]
        assert not left_out or max(left_out) <= min(scores) + 1e-9
        assert all(beam[:-1] in chosen or len(beam) == 2 for beam in chosen)  # closed under prefixes
    assert torch.equal(beams[:, :, 0], token[:, None].expand(-1, kept))


def test_rnn_off_state_is_the_running_sum_of_embeddings_as_in_both_engines(tmp_path):
    drafter = make_drafter(rnn=False)
    assert not any(name.startswith("rnn_") for name in drafter.state_dict())  # the reference layout has none
    h = torch.randn(1, 1, HIDDEN, dtype=torch.float64)
    tokens = torch.tensor([[[4, 7, 9]]])
    e = drafter.embed(tokens)[0, 0]  # [3, d]
    states = [e[0], e[0] + e[1], e[0] + e[1] + e[2]]  # s_i = E(g_i) + s_{i-1}, s_0 = 0
    expected = torch.stack([drafter.lm_head(torch.cat([h[0, 0], s])) for s in states])
    assert torch.allclose(drafter(h, tokens)[0, 0], expected)
    drafter.save_pretrained(tmp_path)
    loaded = RecurrentDrafter.from_pretrained(tmp_path, drafter._embedding[0], dtype=torch.float64)
    assert torch.equal(loaded(h, tokens), drafter(h, tokens))


def test_bad_folders_and_mismatched_targets(tmp_path):
    with pytest.raises(DrafterError, match="not a drafter folder"):
        RecurrentDrafter.from_pretrained(tmp_path)
    make_drafter().save_pretrained(tmp_path)
    with pytest.raises(DrafterError, match="hidden size 32 and vocabulary 96.*hidden size 64"):
        RecurrentDrafter.from_pretrained(tmp_path).check_fits(64, VOCAB)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DrafterError, match="invalid JSON"):
        RecurrentDrafter.from_pretrained(tmp_path)


def test_tied_head_is_the_target_rows_times_a_projection_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny_target("llama").to(torch.float64)
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, draft_vocab_size=12, tied_head=True)
    drafter = RecurrentDrafter(config).to(torch.float64)
    assert torch.equal(drafter.lm_head[-1].weight[:, :HIDDEN], torch.eye(HIDDEN, dtype=torch.float64))
    torch.nn.init.normal_(drafter.lm_head[-1].weight)
    drafter.draft_vocab.copy_(torch.randperm(VOCAB)[:12])
    drafter.attach(model.get_input_embeddings(), model.get_output_embeddings())
    rows = model.get_output_embeddings().weight[drafter.draft_vocab]
    h, s = torch.randn(3, HIDDEN, dtype=torch.float64), torch.randn(3, HIDDEN, dtype=torch.float64)
    x = torch.cat([h, s], dim=-1)
    for block in drafter.lm_head[:-1]:
        x = x + torch.nn.functional.silu(block.linear(x))
    assert torch.allclose(drafter.head(h, s), x @ drafter.lm_head[-1].weight.T @ rows.T)
    assert torch.allclose(drafter.head(h, s), x @ drafter.reference_head().T)
    drafter.save_pretrained(tmp_path)
    assert "output_rows" not in load_file(tmp_path / "model.safetensors")  # the target's, never saved
    loaded = RecurrentDrafter.from_pretrained(
        tmp_path, model.get_input_embeddings(), torch.float64, output_embedding=model.get_output_embeddings()
    )
    assert torch.equal(loaded.output_rows, rows)  # re-gathered with the loaded draft vocabulary
    assert torch.equal(
        beam_search(drafter, h, torch.tensor([1, 2, 3]), 4, 4), beam_search(loaded, h, torch.tensor([1, 2, 3]), 4, 4)
    )
    with pytest.raises(DrafterError, match="attach"):
        RecurrentDrafter.from_pretrained(tmp_path).head(h.float(), s.float())
