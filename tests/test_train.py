"""Drafter training: it learns, it resumes to the same weights, its output loads back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import HIDDEN, VOCAB, tiny_target, word_tokenizer
from safetensors.torch import load_file

from redrafter.decode import DrafterProposer, SpeculativeDecoder
from redrafter.distill import DistillConfig, distill, make_batch
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.ngrams import build_table
from redrafter.train import (
    TrainConfig,
    Trainer,
    choose_draft_vocab,
    coverage,
    draft_targets,
    plot_metrics,
    walk_answers,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny float32 target and a corpus of its own greedy continuations of random prompts."""
    folder = tmp_path_factory.mktemp("corpus")
    model = tiny_target("llama", seed=9, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with open(folder / "p.jsonl", "w") as handle:
        for _ in range(120):
            words = " ".join(f"w{int(x)}" for x in torch.randint(5, 96, (4,), generator=generator))
            handle.write(json.dumps({"prompt": words}) + "\n")
    config = DistillConfig(
        model="tiny", prompts=str(folder / "p.jsonl"), shard_size=64, batch_size=32, max_new_tokens=24, dtype="float32"
    )
    pairs = distill(config, folder / "data", model, word_tokenizer(), progress=False).conversations()
    return model, pairs


CONFIG = dict(
    heldout_every=5,
    batch_size=16,
    warmup=10,
    eval_every=1000,
    checkpoint_every=1000,
    eval_positions=256,
    autocast=False,
    lr=3e-3,
)


def engine_tokens_per_step(model, proposer, pairs) -> float:
    """Tokens per target forward of the real decode loop, checking its output equals greedy."""
    decoder = SpeculativeDecoder(model, proposer, eos_token_ids=[1])
    total_steps = total_tokens = 0
    for prompt, _ in pairs:
        steps = list(decoder.decode([prompt], 24))
        emitted = [t for s in steps for t in s.tokens[0]]
        ids = torch.tensor([prompt])
        greedy = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=1
        )[0, len(prompt) :].tolist()
        assert emitted == greedy
        total_steps, total_tokens = total_steps + len(steps), total_tokens + len(emitted)
    return total_tokens / total_steps


def test_training_raises_heldout_acceptance_well_above_random(setup, tmp_path):
    model, pairs = setup
    trainer = Trainer(model, TrainConfig(steps=150, draft_vocab=0, **CONFIG), pairs, tmp_path, progress=False)
    before = trainer.evaluate()
    drafter = trainer.train()
    after = trainer.evaluate()
    assert before["tokens_per_step"] < 1.2
    assert after["tokens_per_step"] > 2.0, after
    assert min(after["accuracy"]) > 3 * max(before["accuracy"])
    # The trained drafter, loaded back, speeds up the real decode loop and keeps its output.
    loaded = RecurrentDrafter.from_pretrained(tmp_path).attach(model.get_input_embeddings())
    assert torch.equal(loaded.rnn_w.weight, drafter.rnn_w.weight)

    # Random targets repeat tokens a lot, so compare with a drafter that repeats the last token.
    def repeat_last(hidden, last_token, positions):
        return last_token[:, None, None].expand(-1, 1, 5)

    heldout = [pairs[i] for i in trainer.heldout_idx[:12]]
    trained = engine_tokens_per_step(model, DrafterProposer(loaded, 4, 5), heldout)
    repeating = engine_tokens_per_step(model, repeat_last, heldout)
    assert trained > repeating + 0.4, (trained, repeating)
    # The walked estimate is the loop itself: same steps, step by step, along each held-out answer.
    decoder = SpeculativeDecoder(model, DrafterProposer(loaded, 4, 5), eos_token_ids=[1])
    for index in trainer.heldout_idx[:6]:
        prompt, response = pairs[index]
        loop = [len(step.tokens[0]) for step in decoder.decode([prompt], len(response) + 10)][1:]  # after the prefill
        ids, attention, start = make_batch([pairs[index]], pad=0)
        inputs, labels, valid = draft_targets(ids, attention, start, 4)
        hidden = trainer.target_states([index], ids, attention)
        walk = walk_answers(loaded, hidden, inputs, labels, valid.all(dim=2), start, attention.sum(1), trainer.config)
        assert walk and walk == loop[: len(walk)], (walk, loop)
    assert after["tokens_per_step_walk"] <= after["tokens_per_step"] + 0.2
    # Metrics were logged and plotted.
    assert (tmp_path / "metrics.jsonl").read_text().count('"eval"') == 1
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_reaches_the_same_weights(setup, tmp_path):
    model, pairs = setup
    config = TrainConfig(steps=12, draft_vocab=40, kd_weight=0.5, kd_temperature=2.0, position_fraction=0.5, **CONFIG)
    whole = Trainer(model, config, pairs, tmp_path / "whole", progress=False).train()
    first = Trainer(model, config, pairs, tmp_path / "cut", progress=False)
    first.train(stop_after=5)
    second = Trainer(model, config, pairs, tmp_path / "cut", progress=False)
    second.load_checkpoint()
    assert second.step == 5
    _, all_positions = Trainer(model, TrainConfig(**CONFIG), pairs, tmp_path / "all", progress=False).loss(
        second.batch_for_step(5), 5
    )
    _, half_positions = second.loss(second.batch_for_step(5), 5)
    assert half_positions["positions"] < 0.7 * all_positions["positions"]
    resumed = second.train()
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_reduced_draft_vocabulary_is_the_most_frequent_tokens(setup):
    _, pairs = setup
    train = [pairs[i] for i in range(len(pairs)) if i % 5 != 4]
    vocab = choose_draft_vocab(train, 96, 10)
    counts = torch.bincount(torch.tensor([t for _, r in train for t in r]), minlength=96)
    assert len(vocab) == 10 and set(vocab.tolist()) == set(counts.topk(10).indices.tolist())
    assert coverage(train, vocab) == pytest.approx(counts.topk(10).values.sum().item() / counts.sum().item())
    assert torch.equal(choose_draft_vocab(train, 96, 0), torch.arange(96))


def test_cli_train_writes_a_usable_drafter_folder(setup, tmp_path, capsys):
    from redrafter.cli import main

    model, _ = setup
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    corpus = tmp_path.parent / "corpus0" / "data"  # written by the module fixture
    args = [
        "train",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path / "d"),
        "--steps",
        "6",
        "--warmup",
        "2",
        "--eval-every",
        "3",
        "--draft-vocab",
        "30",
        "--heldout-every",
        "5",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["steps"] == 6 and report["draft_vocab"] == 30 and 0 < report["draft_vocab_coverage_heldout"] <= 1
    assert len(report["heldout"]["accuracy"]) == 4
    assert (tmp_path / "d" / "metrics.png").is_file()
    assert RecurrentDrafter.from_pretrained(tmp_path / "d").config.draft_vocab_size == 30
    # A shippable variant: tied head, saved in bfloat16, usable by the API.
    shipped = [*args[:6], str(tmp_path / "d2"), *args[7:], "--tied-head", "--save-dtype", "bfloat16"]
    assert main(shipped) == 0
    tensors = load_file(tmp_path / "d2" / "model.safetensors")
    assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.bfloat16}
    assert tensors["lm_head.2.weight"].shape == (model.config.hidden_size, 2 * model.config.hidden_size)
    from redrafter.api import ReDrafter

    rd = ReDrafter.from_pretrained(str(tmp_path / "model"), drafter=str(tmp_path / "d2"), dtype="float64")
    assert rd.drafter.config.tied_head and rd.generate("a b c", max_new_tokens=5).new_tokens == 5
    capsys.readouterr()
    assert main(args) == 2 and "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already finished: nothing more to do
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no corpus shards" in capsys.readouterr().err


def test_hidden_state_cache_trains_the_same_and_resumes(setup, tmp_path, monkeypatch):
    import redrafter.hidden_cache as module

    model, pairs = setup
    config = TrainConfig(steps=5, draft_vocab=40, **CONFIG)
    plain = Trainer(model, config, pairs, tmp_path / "plain", progress=False).train()
    # Build the cache, interrupted right after its first chunk, then resumed by the trainer.
    real_write_json = module.write_json

    def write_then_stop(path, meta):
        real_write_json(path, meta)
        if meta["done"]:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "write_json", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        module.HiddenStates(tmp_path / "cache", pairs, model, batch_size=16, progress=False)
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["done"] == 16
    monkeypatch.setattr(module, "write_json", real_write_json)
    cached = Trainer(model, config, pairs, tmp_path / "cached", progress=False, hidden_cache=tmp_path / "cache")
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["done"] == len(pairs)
    for index in [0, 20, len(pairs) - 1]:
        prompt, response = cached.pairs[index]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            expected = model.model(input_ids=ids).last_hidden_state[0]
        assert torch.allclose(cached.states.batch([index])[0], expected, atol=1e-5)
    for (name, a), (_, b) in zip(plain.state_dict().items(), cached.train().state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


def test_hidden_state_cache_grows_with_the_corpus(setup, tmp_path):
    import redrafter.hidden_cache as module

    model, pairs = setup
    module.HiddenStates(tmp_path / "cache", pairs[:20], model, batch_size=8, progress=False)
    calls = []
    handle = model.model.register_forward_hook(lambda *args: calls.append(1))
    grown = module.HiddenStates(tmp_path / "cache", pairs, model, batch_size=8, progress=False)
    handle.remove()
    assert len(calls) == -(-(len(pairs) - 20) // 8)  # only the new conversations were run
    for index in [0, 19, 20, len(pairs) - 1]:
        prompt, response = pairs[index]
        with torch.no_grad():
            expected = model.model(input_ids=torch.tensor([prompt + response])).last_hidden_state[0]
        assert torch.allclose(grown.batch([index])[0], expected, atol=1e-5)
    # A changed conversation inside the built part starts the cache over.
    changed = [(pairs[0][0], [1] + pairs[0][1][1:]), *pairs[1:]]
    calls.clear()
    handle = model.model.register_forward_hook(lambda *args: calls.append(1))
    module.HiddenStates(tmp_path / "cache", changed, model, batch_size=8, progress=False)
    handle.remove()
    assert len(calls) == -(-len(pairs) // 8)


def test_cli_ngrams_adds_a_table_to_a_drafter_folder(setup, tmp_path, capsys):
    from redrafter.cli import main

    _, pairs = setup
    corpus = tmp_path.parent / "corpus0" / "data"  # written by the module fixture
    RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB)).save_pretrained(tmp_path / "d")
    assert main(["ngrams", "--data", str(corpus), "--out", str(tmp_path / "d"), "--heldout-every", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"from {len(pairs) - len(pairs) // 5:,} answers" in printed
    assert "tokens per step with the n-gram beam alone" in printed
    table = RecurrentDrafter.from_pretrained(tmp_path / "d").ngrams
    expected = build_table([r for i, (_, r) in enumerate(pairs) if i % 5 != 4], min_n=2, max_n=6, min_count=2)
    assert len(table) > 0 and np.array_equal(table.keys, expected.keys)
    assert np.array_equal(table.followers, expected.followers)
    assert main(["ngrams", "--data", str(corpus), "--out", str(tmp_path / "none")]) == 2
    assert "not a drafter folder" in capsys.readouterr().err
    assert main(["ngrams", "--data", str(corpus), "--out", str(tmp_path / "d"), "--min-n", "4", "--max-n", "2"]) == 2
    assert "--min-n 4 is above --max-n 2" in capsys.readouterr().err


def test_cli_train_init_starts_from_a_drafter_and_keeps_its_shape(setup, tmp_path, capsys):
    from redrafter.cli import main

    model, _ = setup
    model.save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    corpus = tmp_path.parent / "corpus0" / "data"  # written by the module fixture
    common = ["train", "--model", str(tmp_path / "model"), "--data", str(corpus), "--heldout-every", "5"]
    common += ["--steps", "4", "--warmup", "1", "--eval-every", "4"]
    assert main([*common, "--out", str(tmp_path / "base"), "--draft-vocab", "30", "--layers", "1"]) == 0
    assert main(["ngrams", "--data", str(corpus), "--out", str(tmp_path / "base"), "--heldout-every", "5"]) == 0
    base = load_file(tmp_path / "base" / "model.safetensors")
    # At learning rate 0 a run from --init ends with exactly its weights; at 1e-2 it moves on from them.
    assert main([*common, "--out", str(tmp_path / "same"), "--init", str(tmp_path / "base"), "--lr", "0"]) == 0
    same = load_file(tmp_path / "same" / "model.safetensors")
    assert same.keys() == base.keys() and all(torch.equal(same[k], base[k]) for k in base)
    assert main([*common, "--out", str(tmp_path / "moved"), "--init", str(tmp_path / "base"), "--lr", "1e-2"]) == 0
    moved = load_file(tmp_path / "moved" / "model.safetensors")
    assert torch.equal(moved["draft_vocab"], base["draft_vocab"])
    assert not torch.equal(moved["lm_head.0.linear.weight"], base["lm_head.0.linear.weight"])
    config = RecurrentDrafter.from_pretrained(tmp_path / "moved").config
    assert config.draft_vocab_size == 30 and config.num_draft_layers == 1
    assert not (tmp_path / "moved" / "ngrams.safetensors").exists()  # the base's table is of other data
    # --rnn-cell trtllm with --init: the same weights, fine-tuned for TensorRT-LLM's cell.
    assert (
        main([*common, "--out", str(tmp_path / "cell"), "--init", str(tmp_path / "base"), "--rnn-cell", "trtllm"]) == 0
    )
    assert RecurrentDrafter.from_pretrained(tmp_path / "cell").config.rnn_cell == "trtllm"
    assert RecurrentDrafter.from_pretrained(tmp_path / "base").config.rnn_cell == "reference"
    capsys.readouterr()
    init = ["--init", str(tmp_path / "base")]
    assert main([*common, "--out", str(tmp_path / "x"), *init, "--draft-vocab", "20", "--tied-head"]) == 2
    assert "drop --draft-vocab, --tied-head" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x"), "--init", str(tmp_path / "nowhere")]) == 2
    assert "drafter not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
