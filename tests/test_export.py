"""`redrafter export`: the reference layout, round trips through import, the RNN cell check, bad input."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_target
from safetensors.torch import load_file, save_file

from redrafter.beam_search import beam_search
from redrafter.cli import main
from redrafter.drafter import DrafterConfig, DrafterError, RecurrentDrafter
from redrafter.export import export_drafter

EXIT = 48
# Apple's DrafterConfig fields, and ours that both engines ignore (rnn_cell).
CONFIG_KEYS = {
    "model_type",
    "vocab_size",
    "hidden_size",
    "exit_dim",
    "num_draft_layers",
    "num_lookback_tokens",
    "rnn",
    "torch_dtype",
    "rnn_cell",
}


def target():
    return tiny_target("llama", seed=3)  # untied: its output embedding differs from its input one


def drafter_for(model, **kwargs) -> RecurrentDrafter:
    """A float64 drafter with every weight random (no identity start), attached to ``model``."""
    torch.manual_seed(1)
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, **kwargs)
    drafter = RecurrentDrafter(config).to(torch.float64)
    with torch.no_grad():
        for p in drafter.parameters():
            p.normal_(0.0, 0.3)
    if config.draft_vocab_size < VOCAB:
        drafter.draft_vocab.copy_(torch.randperm(VOCAB)[: config.draft_vocab_size])
    return drafter.attach(model.get_input_embeddings(), model.get_output_embeddings())


def drafts(drafter: RecurrentDrafter, hidden: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Beams ``[B, W, L]`` and the drafter's log-probabilities along them, ``[B, W, L - 1, K]``."""
    beams = beam_search(drafter, hidden, token, 4, 4)
    width = beams.shape[1]
    logits = drafter(hidden[:, None, :].expand(-1, width, -1), beams[:, :, :-1])  # [B, W, L - 1, K]
    return beams, logits.log_softmax(dim=-1)


def test_exported_folder_is_the_reference_layout(tmp_path):
    model = target()
    drafter = drafter_for(model, exit_dim=EXIT, num_draft_layers=2, draft_vocab_size=20, tied_head=True)
    export_drafter(drafter, tmp_path / "out", "apple", target=model, dtype=torch.float16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config) == CONFIG_KEYS
    assert config["model_type"] == "recurrent_drafting_drafter"
    assert (config["vocab_size"], config["hidden_size"], config["exit_dim"]) == (VOCAB, HIDDEN, EXIT)
    assert (config["num_draft_layers"], config["rnn"], config["torch_dtype"]) == (2, True, "float16")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    expected = {
        "rnn_w.weight": [HIDDEN, HIDDEN],
        "rnn_u.weight": [HIDDEN, HIDDEN],
        "rnn_u.bias": [HIDDEN],
        "input_proj.weight": [EXIT, 2 * HIDDEN],
        "input_proj.bias": [EXIT],
        "lm_head.0.linear.weight": [EXIT, EXIT],
        "lm_head.0.linear.bias": [EXIT],
        "lm_head.1.linear.weight": [EXIT, EXIT],
        "lm_head.1.linear.bias": [EXIT],
        "lm_head.2.weight": [VOCAB, EXIT],  # full vocabulary, though the drafter's head had 20 rows
    }
    assert {k: list(v.shape) for k, v in tensors.items()} == expected
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert sorted(os.listdir(tmp_path / "out")) == ["apple.sh", "config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]  # no temporary folder left


def test_without_rnn_or_input_projection_the_layout_has_neither(tmp_path):
    model = target()
    export_drafter(drafter_for(model, rnn=False), tmp_path / "out", "trtllm")
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert names == {"lm_head.0.linear.weight", "lm_head.0.linear.bias", "lm_head.1.linear.weight"} | {
        "lm_head.1.linear.bias",
        "lm_head.2.weight",
    }


@pytest.mark.parametrize("cell", ["reference", "trtllm"])
def test_round_trip_of_a_full_vocabulary_drafter_drafts_the_same(tmp_path, cell):
    model = target()
    drafter = drafter_for(model, exit_dim=EXIT, rnn_cell=cell)
    fmt = "apple" if cell == "reference" else "trtllm"
    export_drafter(drafter, tmp_path / "out", fmt, dtype=torch.float64)
    loaded = RecurrentDrafter.from_pretrained(tmp_path / "out", model.get_input_embeddings(), dtype=torch.float64)
    assert loaded.config.rnn_cell == cell and loaded.config.draft_vocab_size == VOCAB
    torch.manual_seed(2)
    hidden, token = torch.randn(3, HIDDEN, dtype=torch.float64), torch.tensor([5, 9, 17])
    beams, logprobs = drafts(drafter, hidden, token)
    beams_back, logprobs_back = drafts(loaded, hidden, token)
    assert torch.equal(beams, beams_back)
    assert torch.allclose(logprobs, logprobs_back, rtol=0, atol=1e-12)  # same weights; float64 rounding only


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_of_a_reduced_vocabulary_matches_on_that_vocabulary(tmp_path, tied):
    model = target()
    source = drafter_for(model, exit_dim=EXIT, draft_vocab_size=20, tied_head=tied)
    export_drafter(source, tmp_path / "out", "apple", target=model, dtype=torch.float64)
    full = RecurrentDrafter.from_pretrained(tmp_path / "out", model.get_input_embeddings(), dtype=torch.float64)
    head = full.lm_head[-1].weight.detach()  # [V, exit_dim]
    # The exported head's rows of the draft vocabulary are the source's own head rows ...
    assert torch.allclose(head[source.draft_vocab], source.reference_head().detach(), rtol=0, atol=1e-12)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[source.draft_vocab] = False
    if tied:  # ... and the others are the target's output rows times the projection
        rows = model.get_output_embeddings().weight[others] @ source.lm_head[-1].weight
        assert torch.allclose(head[others], rows, rtol=0, atol=1e-12)
    else:
        assert not head[others].any()
    # Restricted to that vocabulary again, the imported drafter drafts what the source drafted.
    config = DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, exit_dim=EXIT, draft_vocab_size=20)
    restricted = RecurrentDrafter(config).to(torch.float64)
    state = full.state_dict() | {"lm_head.2.weight": head[source.draft_vocab], "draft_vocab": source.draft_vocab}
    restricted.load_state_dict(state)
    restricted.attach(model.get_input_embeddings())
    torch.manual_seed(2)
    hidden, token = torch.randn(3, HIDDEN, dtype=torch.float64), torch.tensor([5, 9, 17])
    beams, logprobs = drafts(source, hidden, token)
    beams_back, logprobs_back = drafts(restricted, hidden, token)
    assert torch.equal(beams, beams_back)
    assert torch.allclose(logprobs, logprobs_back, rtol=0, atol=1e-10)


def test_the_cell_must_be_the_engines_unless_allowed(tmp_path):
    model = target()
    reference, trtllm = drafter_for(model), drafter_for(model, rnn_cell="trtllm")
    with pytest.raises(DrafterError, match="reference RNN cell but TensorRT-LLM runs the trtllm cell.*1.65"):
        export_drafter(reference, tmp_path / "a", "trtllm")
    with pytest.raises(DrafterError, match="trtllm RNN cell but Apple's ml-recurrent-drafter runs the reference"):
        export_drafter(trtllm, tmp_path / "b", "apple")
    assert not os.listdir(tmp_path)
    export_drafter(reference, tmp_path / "c", "trtllm", allow_cell_mismatch=True)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["rnn_cell"] == "reference"  # what it was trained with, so our import runs it faithfully
    export_drafter(drafter_for(model, rnn=False), tmp_path / "d", "trtllm")  # no RNN: both engines agree


def test_trtllm_commands_name_the_tree_and_the_base_model(tmp_path, model_dir):
    model = target()
    export_drafter(drafter_for(model, rnn_cell="trtllm"), tmp_path / "out", "trtllm", num_beams=6, draft_len=4)
    script = (tmp_path / "out" / "trtllm.sh").read_text()
    assert "--redrafter_num_beams 6 --redrafter_draft_len_per_beam 3" in script  # theirs excludes the root token
    assert "--speculative_decoding_mode explicit_draft_tokens" in script
    assert "BASE_MODEL:?set BASE_MODEL" in script  # no target given: the user must say where it is
    assert os.access(tmp_path / "out" / "trtllm.sh", os.X_OK)
    code = main(["export", str(save(drafter_for(model, rnn_cell="trtllm"), tmp_path / "d"))] + [
        "--format", "trtllm", "--out", str(tmp_path / "cli"), "--model", str(model_dir), "--beams", "3",
    ])  # fmt: skip
    assert code == 0
    script = (tmp_path / "cli" / "trtllm.sh").read_text()
    assert f"BASE_MODEL=${{BASE_MODEL:-{model_dir.resolve()}}}" in script  # a Hugging Face target is used in place
    assert "--redrafter_num_beams 3" in script and not (tmp_path / "cli" / "base_model").exists()


def save(drafter: RecurrentDrafter, folder) -> str:
    drafter.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "case,message",
    [
        ("format", "invalid choice: 'onnx'"),
        ("tied without target", "tied to the target's output embedding: give the target with --model"),
        ("out exists", "exists and is not empty"),
        ("cell", "trtllm RNN cell but Apple's"),
        ("none", "give a drafter folder"),
    ],
)
def test_bad_export_input_is_one_line_and_writes_nothing(capsys, tmp_path, case, message):
    model = target()
    cell = "trtllm" if case == "cell" else "reference"
    drafter = drafter_for(model, tied_head=case == "tied without target", rnn_cell=cell)
    folder = save(drafter, tmp_path / "drafter")
    out = tmp_path / "out"
    if case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    argv = ["export", "none" if case == "none" else folder, "--format", "onnx" if case == "format" else "apple"]
    try:
        code = main(argv + ["--out", str(out)])
    except SystemExit as parser_exit:  # argparse refuses an unknown --format itself
        code = parser_exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["drafter"] + (["out"] if case == "out exists" else [])
    if case == "out exists":
        assert os.listdir(out) == ["keep.txt"]
        assert main(argv + ["--out", str(out), "--force"]) == 0  # replaced whole
        assert sorted(os.listdir(out)) == ["apple.sh", "config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "damage,message",
    [
        ("drop", "tensor rnn_u.bias is missing (expected shape [32])"),
        ("reshape", "tensor lm_head.2.weight has shape [95, 64], expected [96, 64]"),
        ("extra", "unexpected tensors extra.weight"),
    ],
)
def test_a_reference_folder_we_cannot_read_names_the_tensor(capsys, tmp_path, model_dir, damage, message):
    model = target()
    export_drafter(drafter_for(model), tmp_path / "ref", "apple")
    path = tmp_path / "ref" / "model.safetensors"
    tensors = load_file(path)
    if damage == "drop":
        del tensors["rnn_u.bias"]
    elif damage == "reshape":
        tensors["lm_head.2.weight"] = tensors["lm_head.2.weight"][:-1]
    else:
        tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(DrafterError, match=re.escape(message)):
        RecurrentDrafter.from_pretrained(tmp_path / "ref")
    code = main(["generate", "w5 w6", "--model", str(model_dir), "--drafter", str(tmp_path / "ref")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_exported_folder_generates_through_our_loop(capsys, tmp_path, model_dir):
    """Import: ``--drafter`` takes a reference folder (full-vocabulary head, no draft_vocab, no n-grams)."""
    model = target()
    export_drafter(drafter_for(model), tmp_path / "ref", "apple")
    argv = ["generate", "w5 w6 w7", "--model", str(model_dir), "--dtype", "float64", "--max-new-tokens", "12"]
    assert main(argv + ["--json", "--drafter", str(tmp_path / "ref")]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert main(argv + ["--json", "--drafter", "none"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert ours["token_ids"] == plain["token_ids"]


def test_a_gguf_target_travels_as_a_hugging_face_folder_the_converters_read(tmp_path):
    """No folder of its own (a GGUF target): ``base_model/`` in the export's dtype, with the keys
    transformers 4 (which the engines' converters pin) reads: ``torch_dtype`` and ``rope_theta``."""
    from conftest import word_tokenizer
    from transformers import AutoModelForCausalLM

    model = target()
    export_drafter(drafter_for(model), tmp_path / "out", "apple", target=model, tokenizer=word_tokenizer())
    base = tmp_path / "out" / "base_model"
    config = json.loads((base / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    loaded = AutoModelForCausalLM.from_pretrained(base)
    assert loaded.dtype == torch.bfloat16 and model.dtype == torch.float64  # the caller's model is unchanged
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert 'BASE_MODEL=${BASE_MODEL:-"$HERE/base_model"}' in (tmp_path / "out" / "apple.sh").read_text()
