"""The command line and the Python API on a tiny model folder (with a word-level tokenizer)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_target, word_tokenizer
from transformers import MambaConfig, MambaForCausalLM

from redrafter import ReDrafter
from redrafter.cli import main
from redrafter.decode import no_draft
from redrafter.drafter import DrafterConfig, RecurrentDrafter

JSON_KEYS = {"text", "token_ids", "new_tokens", "steps", "tokens_per_step", "seconds", "tokens_per_second"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "lookup_len,ngram_len,tree_nodes",
    [("0", "0", "0"), ("6", "0", "3"), ("0", "5", "0"), ("6", "8", "5")],
)
def test_json_is_one_object_with_the_documented_keys(capsys, model_dir, drafter_dir, lookup_len, ngram_len, tree_nodes):
    code, out, _ = run(
        capsys,
        "generate",
        "w5 w6 w7",
        "--model",
        str(model_dir),
        "--drafter",
        str(drafter_dir),
        "--dtype",
        "float64",
        "--max-new-tokens",
        "12",
        "--beams",
        "3",
        "--draft-len",
        "4",
        "--lookup-len",
        lookup_len,
        "--ngram-len",
        ngram_len,
        "--tree-nodes",
        tree_nodes,
        "--json",
    )
    assert code == 0
    result = json.loads(out)  # exactly one JSON document and nothing else
    assert JSON_KEYS <= set(result)
    assert result["new_tokens"] == len(result["token_ids"]) <= 12
    assert result["steps"] >= 1 and result["tokens_per_step"] == pytest.approx(result["new_tokens"] / result["steps"])
    # The same ids as plain greedy decoding of the templated prompt.
    model = tiny_target("llama", seed=3)
    prompt = word_tokenizer()("w2 w5 w6 w7 w3 w4", add_special_tokens=False)["input_ids"]
    assert prompt == [2, 5, 6, 7, 3, 4]
    ids = torch.tensor([prompt])
    greedy = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=0
    )
    assert result["token_ids"] == greedy[0, len(prompt) :].tolist()


def test_streamed_text_equals_the_json_text(capsys, model_dir, monkeypatch):
    args = ["generate", "-", "--model", str(model_dir), "--drafter", "none", "--dtype", "float64", "--raw"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("w9 w10"))
    code, streamed, err = run(capsys, *args)
    assert code == 0 and "tokens/s" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("w9 w10"))
    _, out, _ = run(capsys, *args, "--json")
    assert streamed == json.loads(out)["text"] + "\n"


def test_python_api_generate_and_stream(model_dir, drafter_dir):
    rd = ReDrafter.from_pretrained(str(model_dir), drafter=str(drafter_dir), dtype="float64", num_beams=2)
    result = rd.generate("w4 w8", max_new_tokens=9)
    stream = rd.stream("w4 w8", max_new_tokens=9)
    assert "".join(stream) == result.text
    assert stream.result.token_ids == result.token_ids
    batch = rd.generate(["w4 w8", "w11"], max_new_tokens=9)
    assert batch[0].token_ids == result.token_ids and len(batch) == 2


def test_beams_0_verifies_the_lookup_beams_alone(model_dir, drafter_dir):
    """The drafter drafts nothing: no drafter proposer, no small tree, and plain greedy's output."""
    rd = ReDrafter.from_pretrained(str(model_dir), drafter=str(drafter_dir), dtype="float64", num_beams=0, lookup_len=4)
    assert rd.decoder.proposer is no_draft and len(rd.decoder.trees) == 1
    plain = ReDrafter.from_pretrained(str(model_dir), drafter="none", dtype="float64")
    prompt = "w4 w8 w4 w8 w4 w8 w4"
    assert rd.generate(prompt, max_new_tokens=12).token_ids == plain.generate(prompt, max_new_tokens=12).token_ids


def other_drafter(tmp_path):
    RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN * 2, vocab_size=VOCAB)).save_pretrained(tmp_path / "d")
    return str(tmp_path / "d")


def mamba_folder(tmp_path):
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1)
    MambaForCausalLM(config).save_pretrained(tmp_path / "mamba")
    word_tokenizer().save_pretrained(tmp_path / "mamba")
    return str(tmp_path / "mamba")


BAD_INPUTS = {
    "missing model": (lambda d, t: ["w5", "--model", str(t / "nope")], "model not found"),
    "other drafter": (lambda d, t: ["w5", "--model", str(d), "--drafter", other_drafter(t)], "hidden size 64"),
    "missing drafter": (lambda d, t: ["w5", "--model", str(d), "--drafter", str(t / "nope")], "drafter not found"),
    "empty prompt": (lambda d, t: ["  ", "--model", str(d)], "prompt is empty"),
    "long prompt": (lambda d, t: [" ".join(["w5"] * 70), "--model", str(d)], "context is 64"),
    "no tree masks": (lambda d, t: ["w5", "--model", mamba_folder(t)], "model type 'mamba'"),
    "unknown device": (lambda d, t: ["w5", "--model", str(d), "--device", "gpu0"], "device 'gpu0' is not usable"),
    "absent device": (lambda d, t: ["w5", "--model", str(d), "--device", "cuda:63"], "device 'cuda:63' is not usable"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(capsys, model_dir, tmp_path, case):
    make_args, message = BAD_INPUTS[case]
    code, out, err = run(capsys, "generate", *make_args(model_dir, tmp_path), "--dtype", "float64", "--json")
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("redrafter: error")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["distill", "train"])
def test_a_device_this_machine_lacks_is_one_line_and_leaves_nothing(capsys, model_dir, tmp_path, command):
    args = [command, "--model", str(model_dir), "--out", str(tmp_path / "out"), "--device", "cuda:63"]
    if command == "train":  # a real corpus, so that the device is what fails
        (tmp_path / "p.jsonl").write_text('{"prompt": "w5 w6"}\n')
        corpus = ["--model", str(model_dir), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "3"]
        assert run(capsys, "distill", *corpus, "--out", str(tmp_path / "corpus"), "--dtype", "float32")[0] == 0
        args += ["--data", str(tmp_path / "corpus")]
    code, _, err = run(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("redrafter: error")]
    assert code != 0 and len(lines) == 1 and "device 'cuda:63' is not usable" in lines[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--beams", "-1"],
        ["--draft-len", "-1"],
        ["--max-new-tokens", "x"],
        ["--lookup-len", "-1"],
        ["--ngram-len", "-2"],
        ["--tree-nodes", "-3"],
    ],
)
def test_bad_numbers_are_refused_by_the_parser(capsys, model_dir, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "w5", "--model", str(model_dir), *flag])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "must be at least" in err or "expected an integer" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "redrafter.cli", "generate", "hi", "--model", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().startswith("redrafter: error: model not found") and "Traceback" not in proc.stderr


def test_sampling_flags(capsys, model_dir, drafter_dir):
    base = [
        "generate",
        "w5 w6",
        "--model",
        str(model_dir),
        "--drafter",
        str(drafter_dir),
        "--dtype",
        "float64",
        "--json",
        "--max-new-tokens",
        "8",
    ]
    runs = [
        run(capsys, *base, "--temperature", "1.3", "--top-k", "20", "--top-p", "0.9", "--seed", str(s))
        for s in (1, 1, 2)
    ]
    assert all(code == 0 for code, _, _ in runs)
    ids = [json.loads(out)["token_ids"] for _, out, _ in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    for flag, value in [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5")]:
        code, out, err = run(capsys, *base, flag, value)
        assert code == 2 and out == "" and err.count("redrafter: error") == 1


def test_prompts_file_to_jsonl_in_order_with_a_bad_prompt_reported(capsys, model_dir, drafter_dir, tmp_path):
    texts = ["w5 w6", "w7", " ".join(["w8"] * 70), "w9 w10 w11", "w12"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    code, stdout, err = run(
        capsys,
        "generate",
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--drafter",
        str(drafter_dir),
        "--dtype",
        "float64",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "10",
    )
    assert code == 1 and "prompt 3: the prompt has" in err and "4 of 5 prompts generated" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and "error" in rows[2]
    rd = ReDrafter.from_pretrained(str(model_dir), drafter=str(drafter_dir), dtype="float64")
    for row, text in zip(rows, texts, strict=True):
        if "error" not in row:
            assert row["token_ids"] == rd.generate(text, max_new_tokens=10).token_ids


def test_a_batch_out_of_memory_is_split_and_retried(model_dir, monkeypatch):
    rd = ReDrafter.from_pretrained(str(model_dir), drafter="none", dtype="float64")
    real = rd.generate_ids
    sizes = []

    def small_memory(prompts, *args):
        sizes.append(len(prompts))
        if len(prompts) > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(prompts, *args)

    monkeypatch.setattr(rd, "generate_ids", small_memory)
    rows = rd.generate_many(["w5", "w6", "w7"], batch_size=3, max_new_tokens=4)
    assert [r["index"] for r in rows] == [0, 1, 2] and all("token_ids" in r for r in rows)
    assert sizes[0] == 3 and sizes.count(1) == 3


def test_model_from_an_installed_gguf_package(tmp_path, monkeypatch):
    """``--model PACKAGE``: the one .gguf file the package holds, or what its ``assemble()`` returns."""
    from redrafter.models import ModelError, gguf_source, package_gguf

    holds = tmp_path / "holds_gguf"
    (holds / "weights").mkdir(parents=True)
    (holds / "__init__.py").write_text("import a_missing_dependency\n")  # found without importing it
    (holds / "weights" / "m.gguf").write_bytes(b"GGUF")
    chunked = tmp_path / "chunked_gguf"
    chunked.mkdir()
    made = tmp_path / "assembled.gguf"
    made.write_bytes(b"GGUF")
    (chunked / "__init__.py").write_text(f"def assemble():\n    return {str(made)!r}\n")
    two = tmp_path / "two_gguf"
    two.mkdir()
    (two / "__init__.py").write_text("")
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    (tmp_path / "no_gguf").mkdir()
    (tmp_path / "no_gguf" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_gguf("holds-gguf") == holds / "weights" / "m.gguf"
    assert gguf_source("chunked-gguf") == made
    assert package_gguf("no-such-package-here") is None
    with pytest.raises(ModelError, match="holds 2 .gguf files"):
        package_gguf("two-gguf")
    with pytest.raises(ModelError, match="no .gguf file and has no assemble"):
        package_gguf("no-gguf")
