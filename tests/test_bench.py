"""redrafter bench: the results schema, atomic writes, the identical-output check, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import HIDDEN, VOCAB
from test_cli import run

import redrafter.bench as bench
from redrafter import ReDrafter
from redrafter.drafter import DrafterConfig, RecurrentDrafter
from redrafter.files import atomic_write
from redrafter.lean_decoder import LeanDecoder, PackedForward
from redrafter.quant import PackedLinear, packs_linears, quantization_refusal
from redrafter.sampling import SamplingParams

CATEGORIES = ["writing", "math", "writing"]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [
        {"question_id": i, "category": c, "turns": [f"w{5 + i} w{9 + i} w{30 + i}", "second turn"]}
        for i, c in enumerate(CATEGORIES)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def bench_args(model_dir, drafter_dir, prompt_file, out, *extra):
    return [
        "bench",
        "--prompts",
        str(prompt_file),
        "--model",
        str(model_dir),
        "--drafter",
        str(drafter_dir),
        "--dtype",
        "float64",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
        *extra,
    ]


ALL_METHODS = ("redrafter", "ar", "hf", "hf-pld", "redrafter-w1", "redrafter-nolookup", "redrafter-static")


def test_results_schema(capsys, model_dir, drafter_dir, prompt_file, tmp_path):
    out = tmp_path / "out"
    torch.manual_seed(4)  # another drafter side by side: one that fuses layer 0 of the 2-layer target
    fused = RecurrentDrafter(DrafterConfig(hidden_size=HIDDEN, vocab_size=VOCAB, fused_layers=[0]))
    with torch.no_grad():
        fused.fuse.weight.normal_(0, 0.2)
    fused.save_pretrained(tmp_path / "fused")
    code, stdout, _ = run(
        capsys,
        *bench_args(
            model_dir,
            drafter_dir,
            prompt_file,
            out,
            "--methods",
            *ALL_METHODS,
            "--variant",
            "w2l2",
            "beams=2,draft-len=2,lookup-len=0,ngram-len=0",
            "--variant",
            "fused",
            f"drafter={tmp_path / 'fused'}",
            "--variant",
            "plain",
            "drafter=none",
            "--speculation",  # a tree every step: what the replay below replays
            "always",
        ),
    )
    assert code == 0 and "speedup" in stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "methods", "summary", "per_category", "prompts"}
    assert results["config"]["adaptive"] is False and "policy" not in results["methods"]["redrafter"]
    for key in [
        "model",
        "drafter",
        "dtype",
        "beams",
        "draft_len",
        "lookup_len",
        "tree_nodes",
        "max_new_tokens",
        "torch",
        "transformers",
    ]:
        assert key in results["config"]
    assert set(results["methods"]) == {*ALL_METHODS, "w2l2", "fused", "plain"}
    # The variant's settings took: two tokens a step at most (L = 2, no lookup beams), same output.
    for record in results["prompts"]:
        entry = record["methods"]["w2l2"]
        assert set(entry["accepted_histogram"]) <= {"1", "2"} and entry["identical"]
    for row in results["methods"].values():
        assert set(row) >= {"tokens_per_second", "tokens_per_step", "seconds", "new_tokens"}
    assert set(results["summary"]) >= {"speedup", "speedup_vs_hf", "tokens_per_step", "identical"}
    assert results["summary"]["identical"] == 1.0  # float64: exact
    assert set(results["per_category"]) == {"writing", "math"}
    assert set(results["per_category"]["math"]) >= {"speedup", "tokens_per_step", "tokens_per_second"}
    assert len(results["prompts"]) == 3
    first = results["prompts"][0]["methods"]
    assert first["ar"]["steps"] == first["ar"]["new_tokens"] == first["hf"]["new_tokens"]
    assert first["plain"]["steps"] == first["plain"]["new_tokens"] and first["plain"]["identical"]  # drafter=none
    assert sum(first["redrafter"]["accepted_histogram"].values()) == first["redrafter"]["steps"] - 1
    # Replayed along ar's output, which every drafting method's output equals here (float64), the
    # drafts take exactly the steps the method took; methods without our drafter are not replayed.
    for record in results["prompts"]:
        for name, entry in record["methods"].items():
            if name.startswith("redrafter") or name in ("w2l2", "fused"):
                assert entry["replayed_steps"] == entry["steps"], (name, record["question_id"])
            else:
                assert "replayed_steps" not in entry
    assert results["summary"]["replayed_tokens_per_step"] == results["summary"]["tokens_per_step"]
    assert "on ar text" in stdout
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG" and (out / "acceptance.png").is_file()
    assert not list(out.glob(".*"))


def test_identical_check_catches_an_engine_that_changes_output(
    model_dir,
    drafter_dir,
    prompt_file,
    tmp_path,
    monkeypatch,
):
    real = bench.make_methods

    def broken(*args):
        methods = real(*args)
        honest = methods["redrafter"].run

        def changed(ids):
            result = honest(ids)
            result.token_ids[2] = (result.token_ids[2] + 1) % 96
            return result

        methods["redrafter"].run = changed
        return methods

    monkeypatch.setattr(bench, "make_methods", broken)
    from redrafter.cli import main

    assert main(bench_args(model_dir, drafter_dir, prompt_file, tmp_path / "o", "--methods", "redrafter", "ar")) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["summary"]["identical"] == 0.0 and results["summary"]["different"] == 3
    entry = results["prompts"][0]["methods"]["redrafter"]
    assert entry["identical"] is False and entry["first_difference"] == 2 and entry["top2_gap"] is not None


def test_sweep_and_batch_sizes(capsys, model_dir, drafter_dir, prompt_file, tmp_path):
    out = tmp_path / "s"
    code, stdout, _ = run(
        capsys,
        *bench_args(
            model_dir,
            drafter_dir,
            prompt_file,
            out,
            "--methods",
            "redrafter",
            "--sweep",
            "--sweep-beams",
            "1,2",
            "--sweep-draft-lens",
            "2,3",
            "--tree-nodes",
            "3",
            "--batch-size",
            "1,2",
            "--profile",
        ),
    )
    assert code == 0 and "sweep: best" in stdout and "profile redrafter:" in stdout
    sweep = json.loads((out / "sweep.json").read_text())
    lookup_nodes = sweep["lookup_len"] - 1 + sweep["ngram_len"] - 1  # both lookup beams' tokens after the root
    assert sweep["ngram_len"] == 4  # the fixture's drafter has an n-gram table: its beam is on by default
    # --tree-nodes 3 caps W = 2, L = 3 at 3 drafter nodes of 4.
    assert len(sweep["shapes"]) == 4 and {s["tree_size"] - lookup_nodes for s in sweep["shapes"]} == {2, 3, 4}
    batch = json.loads((out / "batch.json").read_text())
    assert set(batch["methods"]) == {"ar", "redrafter"} and set(batch["methods"]["ar"]) == {"1", "2"}
    assert (out / "sweep.png").is_file() and (out / "batch.png").is_file()
    profile = json.loads((out / "profile.json").read_text())["methods"]
    for row in profile.values():  # the stages and the rest add up to the whole step
        assert row["steps"] > 0 and {"draft: beam search", "target: forward", "cache: keep path"} <= set(
            row["stages_ms_per_step"]
        )
        assert sum(row["stages_ms_per_step"].values()) == pytest.approx(row["ms_per_step"], abs=0.01)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--methods", "redrafter", "bogus"], "unknown method(s) bogus"),
        (["--methods", "redrafter-nornn"], "needs --ablation-drafter"),
        (["--variant", "w2", "beams=2,depth=3"], "'depth=3' is not SETTING=N"),
        (["--variant", "w2", "beams"], "'beams' is not SETTING=N"),
        (["--variant", "w2", "beams=two"], "beams takes a whole number, got 'two'"),
        (["--variant", "w2", "beams=0,lookup-len=0,ngram-len=0"], "--beams 0 verifies the lookup beams alone"),
        (["--variant", "ar", "beams=2"], "--variant ar: the name of a method"),
        (["--variant", "w2", "beams=2", "--variant", "w2", "beams=3"], "each NAME once"),
        (["--variant", "w2", "beams=2", "--drafter", "none"], "need a drafter"),
        (["--variant", "d2", "drafter=/no/such/folder"], "drafter not found: /no/such/folder"),
        (["--variant", "p", "packed=1"], "packed weights: it needs float weights in bfloat16 or float16"),
        (["--variant", "q", "weights=int5"], "--variant q: weights is one of float, int8, int4, w4a8, not 'int5'"),
    ],
)
def test_bad_arguments(capsys, model_dir, drafter_dir, prompt_file, tmp_path, extra, message):
    code, out, err = run(capsys, *bench_args(model_dir, drafter_dir, prompt_file, tmp_path / "x", *extra))
    assert code == 2 and err.count("redrafter: error") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [("", "no prompts"), ("{bad\n", ":1: invalid JSON")])
def test_bad_prompt_files(capsys, model_dir, drafter_dir, tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    code, _, err = run(capsys, *bench_args(model_dir, drafter_dir, tmp_path / "p.jsonl", tmp_path / "x"))
    assert code == 2 and err.count("redrafter: error") == 1 and message in err


@pytest.mark.parametrize("flag", [["--limit", "0"], ["--batch-size", "1,x"], ["--sweep-beams", "0"]])
def test_bad_numbers(capsys, model_dir, drafter_dir, prompt_file, tmp_path, flag):
    with pytest.raises(SystemExit) as exit_info:
        from redrafter.cli import main

        main(bench_args(model_dir, drafter_dir, prompt_file, tmp_path / "x", *flag))
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode == (tmp_path / "b.json").stat().st_mode


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_int4_bench_with_a_stratified_subset_and_the_cost_curve(capsys, model_dir, drafter_dir, prompt_file, tmp_path):
    out = tmp_path / "q"
    extra = ["--dtype", "float32", "--weights", "int4", "--methods", "redrafter", "llama.cpp", "--per-category", "1"]
    code, stdout, err = run(
        capsys, *bench_args(model_dir, drafter_dir, prompt_file, out, *extra, "--cost-curve", "1,4")
    )
    assert code == 0 and "skipping llama.cpp: the model is not a .gguf file" in err
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["weights"] == "int4" and config["quantization"]["from_weights"] == 14 and config["peak_rss_mb"] > 0
    assert set(results["methods"]) == {"ar", "redrafter"}
    assert [r["category"] for r in results["prompts"]] == ["writing", "math"]  # the first of each category
    assert results["summary"]["identical"] == 1.0  # lossless with int4 weights (float32, row-exact kernels)
    curve = json.loads((out / "cost_curve.json").read_text())["ms_per_forward"]
    here = {w for w in ("int8", "int4", "w4a8") if quantization_refusal("cpu", torch.float32, w) is None}
    assert set(curve) == {"float", *here} and all(set(row) == {"1", "4"} for row in curve.values())
    assert all(ms > 0 for row in curve.values() for ms in row.values()) and "cost int4" in stdout
    assert (out / "cost_curve.png").is_file()


def test_a_variant_on_other_weights_is_held_to_plain_decoding_with_them(
    capsys, model_dir, drafter_dir, prompt_file, tmp_path
):
    """``--variant q4 weights=int4``: the model loaded again with int4 weights, its forwards counted,
    its output held to (and its drafts replayed along) plain decoding with int4 weights, ``ar-int4``,
    added for it; a ``drafter=none`` variant of those weights takes that place when there is one."""
    out = tmp_path / "w"
    extra = [
        "--dtype",
        "float32",
        "--methods",
        "redrafter",
        "--speculation",
        "always",
        "--variant",
        "q4",
        "weights=int4",
    ]
    code, stdout, _ = run(capsys, *bench_args(model_dir, drafter_dir, prompt_file, out, *extra))
    assert code == 0 and "x ar-int4" in stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["ar", "redrafter", "q4", "ar-int4"]
    assert results["config"]["weights"] == "float"
    assert results["methods"]["q4"]["reference"] == results["methods"]["ar-int4"]["reference"] == "ar-int4"
    for record in results["prompts"]:
        q4, plain = record["methods"]["q4"], record["methods"]["ar-int4"]
        assert q4["identical"] and q4["reference"] == "ar-int4"  # float32 int4 kernels: row-exact
        assert plain["steps"] == plain["new_tokens"] and q4["replayed_steps"] == q4["steps"]
    assert results["methods"]["q4"]["replayed_tokens_per_step"] == results["methods"]["q4"]["tokens_per_step"]
    extra += ["--variant", "q4-plain", "weights=int4,drafter=none"]
    code, _, _ = run(capsys, *bench_args(model_dir, drafter_dir, prompt_file, out, *extra))
    results = json.loads((out / "results.json").read_text())
    assert code == 0 and list(results["methods"]) == ["ar", "redrafter", "q4", "q4-plain"]
    assert results["methods"]["q4"]["reference"] == "q4-plain"


def test_llama_cpp_runs_greedy_from_a_fresh_context(monkeypatch, model_dir, tmp_path):
    """The llama.cpp method's wiring, with a stand-in for llama-cpp-python: the GGUF file and torch's
    threads are passed, every run starts from a reset context, and it stops at EOS or the budget."""
    import sys
    import types

    import torch

    from redrafter.api import ReDrafter

    calls = []

    class FakeLlama:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def reset(self):
            calls.append(("reset",))

        def generate(self, ids, **kwargs):
            calls.append(("generate", list(ids), kwargs))
            yield from [7, 8, 1, 9] if ids[0] == 5 else iter(lambda: 6, None)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(bench, "llama_cpp_failure", lambda gguf: None)  # the child-process probe passes
    rd = ReDrafter.from_pretrained(model_dir, drafter="none", dtype="float32")
    rd.decoder.eos_token_ids = frozenset([1])
    counter = bench.ForwardCounter(rd.target)
    gguf = tmp_path / "model.gguf"
    method = bench.make_methods(rd, ["llama.cpp"], 5, None, counter, gguf=gguf)["llama.cpp"]
    assert method.run([5, 2]).token_ids == [7, 8, 1]  # EOS emitted, then the run stops
    run = method.run([4])
    assert run.token_ids == [6] * 5 and run.steps == 5 and run.seconds > 0
    init = calls[0][1]
    assert init["model_path"] == str(gguf) and init["n_threads"] == torch.get_num_threads()
    assert [c[0] for c in calls[1:]] == ["reset", "generate", "reset", "generate"]
    assert calls[2][2]["top_k"] == 1 and calls[2][2]["temp"] == 0.0


def test_latency_cpu_time_and_energy_in_the_results(capsys, model_dir, drafter_dir, prompt_file, tmp_path):
    out = tmp_path / "lat"
    code, stdout, _ = run(capsys, *bench_args(model_dir, drafter_dir, prompt_file, out, "--methods", "redrafter", "hf"))
    assert code == 0 and "TTFT p50" in stdout and "CPU s/tok" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["energy"].startswith("unavailable")  # no NVML device, no RAPL counter here
    # By default our loop chooses tree or plain steps as it measures them, and says what it measured.
    policy = results["methods"]["redrafter"]["policy"]
    assert results["config"]["adaptive"] and policy["1"]["tree_steps"] + policy["1"]["plain_steps"] > 0
    for name, row in results["methods"].items():
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"], name
        assert 0 < row["tpot_p50_ms"] <= row["tpot_p99_ms"], name
        assert row["cpu_seconds_per_token"] > 0 and row["joules_per_token"] is None
    for record in results["prompts"]:
        for name, entry in record["methods"].items():
            assert 0 < entry["first_token_seconds"] <= entry["seconds"], name
            assert entry["cpu_seconds"] > 0 and entry["joules"] is None
    assert (out / "latency.png").is_file()


def test_latency_percentiles_by_hand():
    import numpy as np

    values = [3.0, 1.0, 7.0, 2.0, 10.0]
    for q in (0, 50, 90, 99, 100):
        assert bench.percentile(values, q) == pytest.approx(np.percentile(values, q))
    rows = [
        {"seconds": 1.0, "first_token_seconds": 0.1, "new_tokens": 10},  # 0.1 s/token after the first
        {"seconds": 2.0, "first_token_seconds": 0.5, "new_tokens": 4},  # 0.5 s/token
        {"seconds": 0.3, "first_token_seconds": 0.3, "new_tokens": 1},  # no time per token
    ]
    lat = bench.latency_percentiles(rows)
    assert lat["ttft_p50_ms"] == pytest.approx(300) and lat["ttft_p99_ms"] == pytest.approx(496)
    assert lat["tpot_p50_ms"] == pytest.approx(300) and lat["tpot_p99_ms"] == pytest.approx(496)


def test_energy_meter_reads_rapl_and_nvml(monkeypatch, tmp_path):
    import sys
    import types

    import torch

    counter = tmp_path / "energy_uj"
    (tmp_path / "max_energy_range_uj").write_text("10000000\n")  # 10 J, then the counter wraps
    counter.write_text("9000000\n")
    monkeypatch.setattr(bench, "RAPL_ENERGY", counter)
    meter = bench.EnergyMeter(torch.device("cpu"))
    assert meter.source == "rapl"
    start = meter.read()
    counter.write_text("500000\n")  # wrapped: 1 J to the end of the range, then 0.5 J
    assert meter.since(start) == pytest.approx(1.5)

    readings = iter([1000.0, 1000.0, 4500.0])  # millijoules
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(readings),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    gpu = bench.EnergyMeter(torch.device("cuda", 0))
    assert gpu.source == "nvml" and gpu.since(gpu.read()) == pytest.approx(3.5)
    monkeypatch.setattr(bench, "RAPL_ENERGY", tmp_path / "missing")
    assert bench.EnergyMeter(torch.device("cpu")).read() is None


def test_a_variant_can_leave_out_the_quick_argmax_head(model_dir):
    from redrafter.bench import parse_variant, variant

    rd = ReDrafter.from_pretrained(model_dir, drafter=None, dtype="float64")
    rd.argmax_head = torch.nn.Identity()  # a stand-in: only which engine holds it is checked here
    assert parse_variant("q", "quick-argmax=0") == {"argmax_head": 0}
    assert variant(rd, **parse_variant("q", "quick-argmax=0")).decoder.argmax_head is None
    assert variant(rd, **parse_variant("q", "quick-argmax=1")).decoder.argmax_head is rd.argmax_head
    assert variant(rd).decoder.argmax_head is rd.argmax_head


@pytest.mark.skipif(not packs_linears("cpu", torch.bfloat16), reason="no native bfloat16 products on this CPU")
def test_bfloat16_weights_are_packed_unless_a_variant_says_not(model_dir):
    from redrafter.bench import parse_variant, variant

    rd = ReDrafter.from_pretrained(model_dir, drafter=None, dtype="bfloat16")
    assert rd.packed is None and isinstance(rd.decoder.forward, PackedForward)  # where it applies: here
    assert isinstance(rd.decoder.head, PackedLinear) and rd.decoder.head.linear is rd.target.get_output_embeddings()
    unpacked = variant(rd, **parse_variant("u", "packed=0"))
    assert isinstance(unpacked.decoder.forward, LeanDecoder) and unpacked.decoder.forward is rd.decoder.forward.lean
    assert unpacked.decoder.head is None
    ids = rd.encode("w5 w6 w7")
    assert rd.generate_ids([ids], 6)[0].token_ids == unpacked.generate_ids([ids], 6)[0].token_ids
    sampled = SamplingParams(temperature=0.8, seed=1)  # logits through the packed head, and not
    assert rd.generate_ids([ids], 6, sampled)[0].token_ids == unpacked.generate_ids([ids], 6, sampled)[0].token_ids


def test_a_llama_cpp_that_crashes_is_skipped_with_the_reason(monkeypatch, tmp_path):
    """The llama.cpp method is probed in a child process first: a build that crashes (as a native
    build's AMX kernels do on some CPUs) is named, with how to rebuild it, instead of killing the run."""
    gguf = tmp_path / "model.gguf"
    monkeypatch.setattr(bench, "LLAMA_CPP_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    monkeypatch.setattr(bench, "_llama_cpp_system_info", lambda: "AVX512 = 1 | AMX_INT8 = 1 |")
    why = bench.llama_cpp_failure(gguf)
    assert "model.gguf" in why and "crashed (signal 11)" in why and "-DGGML_NATIVE=OFF" in why
    monkeypatch.setattr(bench, "LLAMA_CPP_PROBE", "raise SystemExit('no such file')")
    assert bench.llama_cpp_failure(gguf).endswith("no such file")
    monkeypatch.setattr(bench, "LLAMA_CPP_PROBE", "pass")
    assert bench.llama_cpp_failure(gguf) is None
