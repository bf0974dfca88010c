"""The self-distillation corpus: resumable, benchmark-clean, clear errors on bad prompt files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_target, word_tokenizer

from redrafter.distill import Corpus, DistillConfig, distill, is_looping, read_openers, read_tasks, templated
from redrafter.errors import RedrafterError
from redrafter.prompts import BenchmarkGuard, read_prompts


@pytest.fixture(scope="module")
def target():
    model = tiny_target("llama", seed=9, dtype=torch.float32)
    model.generation_config.eos_token_id = 1
    return model, word_tokenizer()


def prompt_file(tmp_path, n: int):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"w{5 + i} w{20 + i} w{40 + i}"}) + "\n" for i in range(n)))
    return str(path)


def test_corpus_holds_the_targets_own_greedy_answers(tmp_path, target):
    model, tokenizer = target
    config = DistillConfig(
        model="tiny", prompts=prompt_file(tmp_path, 5), shard_size=2, batch_size=2, max_new_tokens=6, dtype="float32"
    )
    corpus = distill(config, tmp_path / "data", model, tokenizer, progress=False)
    pairs = corpus.conversations()
    assert len(corpus.shards) == 3 and len(pairs) == 5
    for prompt, response in pairs:
        ids = torch.tensor([prompt])
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=1
        )
        assert response == greedy[0, len(prompt) :].tolist()[: len(response)]
        assert len(response) == 6 or response[-1] == 1
    assert corpus.meta()["totals"]["conversations"] == 5


def test_a_base_model_continues_its_prompts_as_raw_text(tmp_path, target):
    """A tokenizer without a chat template (a base model, as Gemma 3 270M): prompts are the raw
    text's ids, which the model continues; self-written prompts are refused with a clear line."""
    model, _ = target
    tokenizer = word_tokenizer()
    tokenizer.chat_template = None
    config = DistillConfig(model="tiny", prompts=prompt_file(tmp_path, 3), shard_size=4, max_new_tokens=5)
    pairs = distill(config, tmp_path / "base", model, tokenizer, progress=False).conversations()
    assert [prompt for prompt, _ in pairs] == [[5 + i, 20 + i, 40 + i] for i in range(3)]
    with pytest.raises(RedrafterError, match="self-written prompts need a chat template; give --prompts FILE"):
        distill(DistillConfig(model="tiny", num_prompts=2), tmp_path / "self", model, tokenizer, progress=False)


def test_an_interrupted_run_resumes_to_the_same_corpus(tmp_path, target, monkeypatch):
    model, tokenizer = target
    config = DistillConfig(
        model="tiny", prompts=prompt_file(tmp_path, 6), shard_size=2, batch_size=2, max_new_tokens=5, dtype="float32"
    )
    whole = distill(config, tmp_path / "whole", model, tokenizer, progress=False).conversations()

    import redrafter.distill as module

    real_write, calls = module._write_shard, []

    def write_then_die(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted while writing the second shard
        real_write(path, *args)

    monkeypatch.setattr(module, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        distill(config, tmp_path / "cut", model, tokenizer, progress=False)
    cut = Corpus(tmp_path / "cut")
    assert len(cut.shards) == 1 and not list(cut.folder.glob(".*"))  # no half-written shard
    monkeypatch.setattr(module, "_write_shard", real_write)
    resumed = distill(config, tmp_path / "cut", model, tokenizer, progress=False)
    assert resumed.conversations() == whole
    assert resumed.meta()["totals"]["conversations"] == 6


def test_a_complete_corpus_is_left_as_is_without_loading_the_model(tmp_path, target, monkeypatch):
    model, tokenizer = target
    config = DistillConfig(model="tiny", prompts=prompt_file(tmp_path, 3), shard_size=2, max_new_tokens=3)
    made = distill(config, tmp_path / "d", model, tokenizer, progress=False).conversations()

    import redrafter.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_target", no_loading)
    # A corpus made on another device re-runs here as a no-op (make corpus on a machine without it).
    assert distill(config, tmp_path / "d", progress=False, device="cuda").conversations() == made
    config.num_prompts = 5  # ignored with a prompt file; a changed setting would still be refused
    config.max_new_tokens = 4
    with pytest.raises(RedrafterError, match="other settings"):
        distill(config, tmp_path / "d", progress=False)


def test_self_written_prompts(tmp_path, target):
    model, tokenizer = target
    config = DistillConfig(
        model="tiny", num_prompts=3, shard_size=3, batch_size=8, max_new_tokens=4, prompt_max_tokens=12, dtype="float32"
    )
    corpus = distill(config, tmp_path / "self", model, tokenizer, progress=False)
    texts = corpus.user_texts()
    assert len(texts) == 3 and len(set(texts)) == 3
    for text, (prompt, _) in zip(texts, corpus.conversations(), strict=True):
        assert prompt == tokenizer(f"w2 {text} w3 w4", add_special_tokens=False)["input_ids"]


def test_settings_change_is_refused(tmp_path, target):
    model, tokenizer = target
    config = DistillConfig(model="tiny", prompts=prompt_file(tmp_path, 2), shard_size=2, max_new_tokens=3)
    distill(config, tmp_path / "d", model, tokenizer, progress=False)
    config.max_new_tokens = 4
    with pytest.raises(RedrafterError, match="other settings.*max_new_tokens"):
        distill(config, tmp_path / "d", model, tokenizer, progress=False)


def test_benchmark_prompts_are_refused(tmp_path, target):
    model, tokenizer = target
    guard = BenchmarkGuard.mt_bench()
    question = "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences"
    assert guard.match(question.upper() + " please!") is not None
    assert guard.match("Write a short poem about autumn leaves.") is None
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hello w5"}) + "\n" + json.dumps({"turns": [question]}) + "\n")
    with pytest.raises(RedrafterError, match="prompt 2 is a near-duplicate of a benchmark prompt"):
        distill(DistillConfig(model="tiny", prompts=str(path)), tmp_path / "out", model, tokenizer, progress=False)
    assert not list((tmp_path / "out").glob("shard-*"))


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "no prompts"),
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', ":2: invalid JSON"),
        ('{"text": "no known field"}\n', ":1: expected a non-empty 'prompt'"),
        ('{"prompt": "   "}\n', ":1: expected a non-empty"),
        ('["a list"]\n', ":1: expected"),
    ],
)
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RedrafterError, match=message):
        read_prompts(path)


def test_prompt_file_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": "a"},
        {"question_id": 7, "category": "math", "turns": ["b", "second turn"]},
        {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "c"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["a", "b", "c"]
    assert (prompts[1].category, prompts[1].question_id) == ("math", 7)


def test_cli_bad_prompt_file_is_one_line_and_no_shard(tmp_path, capsys):
    from redrafter.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    code = main(["distill", "--prompts", str(bad), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("redrafter: error") == 1 and ":1: invalid JSON" in err
    assert not list((tmp_path / "out").glob("shard-*"))


def test_openers_begin_the_self_written_prompts(tmp_path, target):
    model, tokenizer = target
    openers = ["w30 w31", "w40"]
    config = DistillConfig(
        model="tiny",
        num_prompts=6,
        shard_size=3,
        batch_size=8,
        max_new_tokens=3,
        prompt_max_tokens=12,
        dtype="float32",
        openers=openers,
    )
    corpus = distill(config, tmp_path / "steered", model, tokenizer, progress=False)
    texts = corpus.user_texts()
    assert len(texts) == 6 and len(set(texts)) == 6
    assert all(text.startswith(tuple(o + " " for o in openers)) for text in texts)
    assert {text.split()[0] for text in texts} == {"w30", "w40"}  # both drawn
    assert corpus.meta()["config"]["openers"] == openers
    config.openers = ["w50"]
    with pytest.raises(RedrafterError, match="other settings.*openers"):
        distill(config, tmp_path / "steered", model, tokenizer, progress=False)
    with pytest.raises(RedrafterError, match="not both"):
        config = DistillConfig(model="tiny", prompts=prompt_file(tmp_path, 2), openers=["w9"])
        distill(config, tmp_path / "x", model, tokenizer)


def test_openers_file(tmp_path):
    assert len(read_openers("default")) > 20 and "Imagine you are" in read_openers("default")
    path = tmp_path / "openers.txt"
    path.write_text("Write a poem\n\n  Solve  \n")
    assert read_openers(str(path)) == ["Write a poem", "Solve"]
    path.write_text("\n \n")
    with pytest.raises(RedrafterError, match="no openers"):
        read_openers(str(path))
    with pytest.raises(RedrafterError, match="cannot read"):
        read_openers(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "flag,content,message", [("--openers", "\n", "no openers"), ("--tasks", "{text} and {text}\n", "exactly once")]
)
def test_cli_bad_openers_or_tasks_file_is_one_line_and_no_folder(tmp_path, capsys, flag, content, message):
    from redrafter.cli import main

    bad = tmp_path / "list.txt"
    bad.write_text(content)
    code = main(["distill", flag, str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("redrafter: error") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_a_corpus_from_before_openers_resumes_but_refuses_them(tmp_path, target):
    model, tokenizer = target
    config = DistillConfig(model="tiny", num_prompts=2, shard_size=2, batch_size=4, max_new_tokens=3, dtype="float32")
    distill(config, tmp_path / "old", model, tokenizer, progress=False)
    meta_path = tmp_path / "old" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["openers"]  # as written before the setting existed
    meta_path.write_text(json.dumps(meta))
    config.num_prompts = 4
    assert len(distill(config, tmp_path / "old", model, tokenizer, progress=False).conversations()) == 4
    config.openers = ["w30"]
    with pytest.raises(RedrafterError, match="other settings.*openers"):
        distill(config, tmp_path / "old", model, tokenizer, progress=False)


def greedy_text(model, tokenizer, user: str, max_new_tokens: int) -> str:
    ids = torch.tensor([templated(tokenizer, user)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=1,
        pad_token_id=1,
    )[0, ids.shape[1] :].tolist()
    return tokenizer.decode([t for t in out if t != 1], skip_special_tokens=True).strip()


def test_tasks_work_over_the_targets_own_answers(tmp_path, target):
    """With tasks, each stored prompt is a template filled with the target's greedy answer to a
    prompt, and the stored answer is the target's greedy answer to that filled template."""
    model, tokenizer = target
    tasks = ["w60 w61 {text}", "{text} w62"]
    config = DistillConfig(
        model="tiny",
        prompts=prompt_file(tmp_path, 6),
        shard_size=3,
        batch_size=3,
        max_new_tokens=5,
        dtype="float32",
        tasks=tasks,
    )
    corpus = distill(config, tmp_path / "inputs", model, tokenizer, progress=False)
    requests = [p.text for p in read_prompts(prompt_file(tmp_path, 6))]
    texts = corpus.user_texts()
    assert len(texts) == 6
    for request, text, (prompt, response) in zip(requests, texts, corpus.conversations(), strict=True):
        given = greedy_text(model, tokenizer, request, 5)
        assert text in {t.replace("{text}", given) for t in tasks}
        assert prompt == templated(tokenizer, text)
        assert tokenizer.decode([t for t in response if t != 1]).strip() == greedy_text(model, tokenizer, text, 5)
    assert {t.startswith("w60 w61") for t in texts} == {True, False}  # both templates drawn
    assert corpus.meta()["config"]["tasks"] == tasks
    config.tasks = None
    with pytest.raises(RedrafterError, match="other settings.*tasks"):
        distill(config, tmp_path / "inputs", model, tokenizer, progress=False)


def test_tasks_file(tmp_path):
    bundled = read_tasks("default")
    assert len(bundled) > 20 and all(t.count("{text}") == 1 for t in bundled)
    assert any(t.startswith("Translate") for t in bundled) and any("\n" in t for t in bundled)
    path = tmp_path / "tasks.txt"
    path.write_text("Summarize:\\n{text}\n\n")
    assert read_tasks(str(path)) == ["Summarize:\n{text}"]
    path.write_text("Summarize this\n")
    with pytest.raises(RedrafterError, match="template 1 must hold {text} exactly once"):
        read_tasks(str(path))
    path.write_text("\n")
    with pytest.raises(RedrafterError, match="no task templates"):
        read_tasks(str(path))


def test_looping_or_short_answers_are_not_given_inputs():
    prose = " ".join(f"word{i} and more of word{i + 1}" for i in range(10))  # 50 words, few repeated 4-grams
    assert not is_looping(prose)
    assert is_looping("a short answer of five words")
    assert is_looping("The cat sat on the mat. " * 8)  # a greedy loop
    assert is_looping(prose + " the end." + " and so on" * 40)  # prose that falls into one
