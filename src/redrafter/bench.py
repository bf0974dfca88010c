"""``redrafter bench``: the Spec-Bench protocol, every method side by side in one run.

Methods run interleaved per prompt (their order rotating from prompt to prompt) after a warm-up,
so machine noise hits all alike. Every method's target forward passes are counted by a forward
hook on the target itself, so ``tokens_per_step`` means the same thing for every method.
"""

from __future__ import annotations

import importlib.util
import platform
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from .api import DEFAULT_SHAPES, ReDrafter
from .decode import StageClock
from .drafter import RecurrentDrafter
from .errors import RedrafterError
from .files import atomic_write, write_json
from .kv_cache import TreeKVCache
from .lean_decoder import compile_refusal, forward_head, packed_refusal, target_forward
from .models import context_limit, decoder_of, gguf_source, hidden_to_logits, load_target
from .prompts import Prompt
from .quant import WEIGHTS, gguf_argmax_head, quantization_refusal, quantize_target
from .sampling import exact_argmax
from .tree import additive_mask

SHARED_MT_BENCH = Path("../shared/data/mt_bench.jsonl")
OWN_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"
# In bfloat16 the default model's logits after a tree forward and after a one-token forward differ by
# up to 0.25-0.6 (max over the vocabulary, measured at 15 positions), so a top-2 gap below 0.5 can
# be decided by rounding alone.
NEAR_TIE = 0.5


def default_prompt_file() -> Path:
    """``../shared/data/mt_bench.jsonl`` where it exists, else the project's own prompt set."""
    return SHARED_MT_BENCH if SHARED_MT_BENCH.is_file() else OWN_PROMPTS


@dataclass
class Run:
    """One method on one prompt. ``accepted``: tokens emitted per target forward (our loop only);
    ``first_token_seconds``: time to the first token; ``cpu_seconds`` and ``joules`` are filled in by
    the benchmark around the whole run (process CPU time, all threads; energy where a meter is readable)."""

    token_ids: list[int]
    seconds: float
    steps: int
    accepted: list[int] | None = None
    first_token_seconds: float = 0.0
    cpu_seconds: float = 0.0
    joules: float | None = None


RAPL_ENERGY = Path("/sys/class/powercap/intel-rapl:0/energy_uj")


class EnergyMeter:
    """A cumulative energy counter in joules: NVML's for a CUDA device (``nvidia-ml-py``), else the
    CPU package's RAPL counter where readable; ``source`` says which, or why there is none."""

    def __init__(self, device: torch.device) -> None:
        self._read = None
        self.source = "unavailable: no NVML for this device and no readable RAPL counter"
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # millijoules; raises where unsupported
                self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000
                self.source = "nvml"
            except Exception as error:  # no package, no driver, or a GPU without the counter
                self.source = f"unavailable: NVML: {type(error).__name__}"
        elif RAPL_ENERGY.is_file():
            try:
                int(RAPL_ENERGY.read_text())
                wrap = Path(RAPL_ENERGY.parent / "max_energy_range_uj")
                self._wrap = int(wrap.read_text()) / 1e6 if wrap.is_file() else None
                self._read = lambda: int(RAPL_ENERGY.read_text()) / 1e6
                self.source = "rapl"
            except (OSError, ValueError) as error:
                self.source = f"unavailable: RAPL: {type(error).__name__}"

    def read(self) -> float | None:
        """Joules so far (a counter: only differences mean something), or None."""
        return None if self._read is None else float(self._read())

    def since(self, start: float | None) -> float | None:
        """Joules used since ``start`` (a :meth:`read`), or None."""
        if start is None or self._read is None:
            return None
        used = self.read() - start
        if used < 0 and self.source == "rapl" and self._wrap:  # the counter wrapped around
            used += self._wrap
        return used


@dataclass
class Method:
    """A benchmarked method: ``run`` decodes a prompt's ids; ``engine`` is set for our drafting loop
    (its drafts are then also replayed along its reference's output, see
    :meth:`~redrafter.decode.SpeculativeDecoder.replay`). ``reference``: the method whose output this
    one's must equal (plain decoding with the same target weights), and ``target`` that target (whose
    top-2 logits tell a near-tie where they differ; None: the benchmark's own)."""

    run: Callable[[list[int]], Run]
    engine: ReDrafter | None = None
    reference: str = "ar"
    target: PreTrainedModel | None = None


class FirstTokenClock(BaseStreamer):
    """A transformers streamer that notes when ``generate`` emits its first new token."""

    def __init__(self, start: float) -> None:
        self.start, self.seconds, self._puts = start, 0.0, 0

    def put(self, value) -> None:
        self._puts += 1
        if self._puts == 2:  # the first put is the prompt
            self.seconds = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class ForwardCounter:
    """Counts the target's forward passes (hooks on the model's decoder and on its lean forward), and
    those of every other target it is told to :meth:`watch` (another precision's, one count for all)."""

    def __init__(self, target: PreTrainedModel) -> None:
        self.count = 0
        self.handles: list = []
        self.watch(target)

    def watch(self, target: PreTrainedModel) -> None:
        """Count ``target``'s forward passes too."""
        modules = [decoder_of(target), target_forward(target)]
        if compile_refusal(target) is None:  # built lazily: nothing compiles unless a method runs it
            modules.append(target_forward(target, compile=True))
        self.handles += [m.register_forward_hook(self._hook) for m in modules if isinstance(m, torch.nn.Module)]

    def _hook(self, *args) -> None:
        self.count += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def variant(rd: ReDrafter, **changes) -> ReDrafter:
    """An engine on ``rd``'s target with ``rd``'s settings, some of them changed (keyword arguments of
    :class:`ReDrafter`)."""
    settings = dict(
        drafter=rd.drafter,
        num_beams=rd.num_beams,
        draft_len=rd.draft_len,
        lookup_len=rd.lookup_len,
        ngram_len=rd.ngram_len,
        tree_nodes=rd.tree_nodes,
        lookup_nodes=rd.lookup_nodes,
        drafter_guess=rd.drafter_guess,
        lean=rd.lean,
        drafter_weights=rd.drafter_weights,
        adaptive=rd.adaptive,
        small_tree=rd.small_tree,
        lone_tree=rd.lone_tree,
        argmax_head=rd.argmax_head,
        compile=rd.compile,
        packed=rd.packed,
    )
    if "argmax_head" in changes and not isinstance(changes["argmax_head"], torch.nn.Module | None):
        changes["argmax_head"] = rd.argmax_head if changes["argmax_head"] else None  # a variant's 1 or 0
    merged = settings | changes
    if "drafter_guess" not in changes and (merged["num_beams"] or not merged["lookup_nodes"]):
        merged["drafter_guess"] = False  # the guess joins a confidence tree where the drafter drafts nothing
    return ReDrafter(rd.target, rd.tokenizer, **merged, quantization=rd.quantization)


def drafter_alone(rd: ReDrafter) -> ReDrafter:
    """``redrafter-nolookup``: ``rd`` with the drafter's own tree alone, no lookup beam nor confidence tree;
    where ``rd`` drafts nothing (``num_beams`` 0, the w4a8 default), the float weights' drafter tree
    (:data:`~redrafter.api.DEFAULT_SHAPES`), so that it measures what the drafter drafts."""
    shape = (
        {}
        if rd.num_beams
        else {k: getattr(DEFAULT_SHAPES["float"], k) for k in ("num_beams", "draft_len", "tree_nodes")}
    )
    return variant(rd, lookup_len=0, ngram_len=0, lookup_nodes=0, **shape)


def plain_engine(rd: ReDrafter) -> ReDrafter:
    """Plain greedy decoding (``ar``) as ``rd`` runs its target: the same weights, quick argmax head,
    compilation and packing, so that a ratio against it measures speculation alone."""
    return ReDrafter(
        rd.target, rd.tokenizer, None, argmax_head=rd.argmax_head, compile=rd.compile, packed=rd.packed,
        quantization=rd.quantization,
    )  # fmt: skip


# What a --variant may set: its CLI spelling -> the ReDrafter keyword.
VARIANT_SETTINGS = {
    "beams": "num_beams",
    "draft-len": "draft_len",
    "lookup-len": "lookup_len",
    "ngram-len": "ngram_len",
    "tree-nodes": "tree_nodes",
    "lookup-nodes": "lookup_nodes",  # 0: the lookup beams instead of the confidence tree (and drafter-guess=0)
    "drafter-guess": "drafter_guess",  # 0: the confidence tree without the drafter's guess
    "lean": "lean",
    "adaptive": "adaptive",  # 0: a tree every step
    "small-tree": "small_tree",  # 1: adaptive among the tree, the small tree and plain steps; 0: without it
    "lone-tree": "lone_tree",  # 1: one running row takes the tree every step (adaptive from two); 0: measured
    "drafter": "drafter",  # a drafter folder: another drafter side by side (resolved by the CLI); none: plain
    "drafter-weights": "drafter_weights",  # float, int8, int4 or w4a8
    "quick-argmax": "argmax_head",  # 0: the greedy argmax's candidates from the float head
    "compile": "compile",  # 1: the lean forward through torch.compile; 0: eager
    "packed": "packed",  # 0: the lean forward's float products through F.linear (weights reordered every call)
    "weights": "weights",  # float, int8, int4 or w4a8: another target with these weights, at their default tree
}


def parse_variant(name: str, settings: str) -> dict[str, int | str]:
    """``"beams=4,draft-len=3"`` -> ``{"num_beams": 4, "draft_len": 3}`` (keyword arguments of
    :class:`ReDrafter`) for the variant ``name``, or a clear error. ``drafter=FOLDER`` stays a
    string, for the caller to load."""
    changes: dict[str, int | str] = {}
    for item in settings.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if key not in VARIANT_SETTINGS or not sep:
            raise RedrafterError(
                f"--variant {name}: {item.strip()!r} is not SETTING=N with SETTING one of {', '.join(VARIANT_SETTINGS)}"
            )
        if key == "drafter":
            changes["drafter"] = value
            continue
        if key in ("drafter-weights", "weights"):
            if value not in WEIGHTS:
                raise RedrafterError(f"--variant {name}: {key} is one of {', '.join(WEIGHTS)}, not {value!r}")
            changes[VARIANT_SETTINGS[key]] = value
            continue
        try:
            changes[VARIANT_SETTINGS[key]] = int(value)
        except ValueError:
            raise RedrafterError(f"--variant {name}: {key} takes a whole number, got {value!r}") from None
    return changes


def make_methods(
    rd: ReDrafter,
    names: list[str],
    max_new_tokens: int,
    ablation_drafter: RecurrentDrafter | None,
    counter: ForwardCounter,
    variants: dict[str, dict[str, int]] | None = None,
    gguf: Path | None = None,
    load: Callable[[str], ReDrafter] | None = None,
) -> dict[str, Method]:
    """The benchmark's methods by name; ``variants`` adds our loop with some settings changed
    (name -> keyword arguments of :class:`ReDrafter`, as from :func:`parse_variant`). ``llama.cpp``
    decodes greedily through llama-cpp-python on ``gguf`` (the file the target was loaded from) with
    as many threads as torch; without the package or a GGUF file it is skipped with a note.

    A variant with other ``weights`` runs on a second target, ``load(weights)`` (one per precision,
    at that precision's default tree; the variant's other settings apply on top), and its output is
    held to plain decoding with those weights: the first such variant with ``drafter=none``, else
    ``ar-<weights>``, added for it."""
    target = rd.target
    eos = sorted(rd.decoder.eos_token_ids)

    def ours(engine: ReDrafter, reference: str = "ar") -> Method:
        def run(ids: list[int]) -> Run:
            before = counter.count
            result = engine.generate_ids([ids], max_new_tokens)[0]
            return Run(
                result.token_ids, result.seconds, counter.count - before, result.accepted, result.first_token_seconds
            )

        other = engine.target if engine.target is not target else None
        return Method(run, engine if engine.drafter is not None else None, reference, other)

    def hf(**kwargs) -> Method:
        def run(ids: list[int]) -> Run:
            inputs = torch.tensor([ids], device=target.device)
            before, start = counter.count, time.perf_counter()
            clock = FirstTokenClock(start)
            with torch.inference_mode():
                out = target.generate(
                    inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos[0] if eos else 0,
                    streamer=clock,
                    **kwargs,
                )
            seconds = time.perf_counter() - start
            return Run(out[0, len(ids) :].tolist(), seconds, counter.count - before, None, clock.seconds)

        return Method(run)

    def llama_cpp() -> Method:
        from llama_cpp import Llama

        llm = Llama(
            model_path=str(gguf),
            n_ctx=context_limit(target.config),
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )

        def run(ids: list[int]) -> Run:
            tokens: list[int] = []
            llm.reset()  # no prompt prefix reused from the previous run: every method prefills in full
            start = time.perf_counter()
            first = 0.0
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                first = first or time.perf_counter() - start
                tokens.append(token)
                if token in eos or len(tokens) >= max_new_tokens:
                    break
            return Run(tokens, time.perf_counter() - start, len(tokens), None, first)

        return Method(run)

    available: dict[str, Callable[[], Method]] = {
        "redrafter": lambda: ours(rd),
        "ar": lambda: ours(plain_engine(rd)),
        "ar-transformers": lambda: ours(ReDrafter(target, rd.tokenizer, None, lean=False, argmax_head=rd.argmax_head)),
        "hf": lambda: hf(),
        "hf-pld": lambda: hf(prompt_lookup_num_tokens=10),
        "redrafter-w1": lambda: ours(variant(rd, num_beams=1)),
        "redrafter-nolookup": lambda: ours(drafter_alone(rd)),
        "redrafter-nongrams": lambda: ours(variant(rd, ngram_len=0)),
        "redrafter-static": lambda: ours(variant(rd, tree_nodes=0)),
        "redrafter-nornn": lambda: ours(variant(rd, drafter=ablation_drafter)),
        "llama.cpp": llama_cpp,
    }
    unknown = [n for n in names if n not in available]
    if unknown:
        raise RedrafterError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(available)}")
    variants = variants or {}
    taken = [n for n in variants if n in available]
    if taken:
        raise RedrafterError(f"--variant {', '.join(taken)}: the name of a method; choose another")
    if rd.drafter is None and (variants or any(n.startswith("redrafter") for n in names)):
        raise RedrafterError("the redrafter methods and variants need a drafter (--drafter FOLDER)")
    if "redrafter-nornn" in names and ablation_drafter is None:
        raise RedrafterError("redrafter-nornn needs --ablation-drafter FOLDER (a drafter trained with --no-rnn)")
    if "llama.cpp" in names:
        if gguf is None or importlib.util.find_spec("llama_cpp") is None:
            why = "the model is not a .gguf file" if gguf is None else "llama-cpp-python is not installed"
        else:
            why = llama_cpp_failure(gguf)
        if why is not None:
            print(f"redrafter: bench: skipping llama.cpp: {why}", file=sys.stderr)
            names = [n for n in names if n != "llama.cpp"]
    methods = {name: available[name]() for name in names}
    engines = {rd.quantization.weights: rd}  # per precision, the engine whose target a variant runs on
    plain_of: dict[str, str] = {}  # precision -> the name of its plain decoding
    for name, changes in variants.items():
        weights = str(changes.get("weights", rd.quantization.weights))
        if weights not in engines:
            if load is None:
                raise RedrafterError(f"--variant {name}: weights={weights} needs the model loaded again")
            engines[weights] = load(weights)
            counter.watch(engines[weights].target)
        if changes.get("drafter", engines[weights].drafter) is None:
            plain_of.setdefault(weights, name)
    for weights in [w for w in engines if w != rd.quantization.weights and w not in plain_of]:
        plain_of[weights] = f"ar-{weights}"
        if plain_of[weights] in methods or plain_of[weights] in variants:
            raise RedrafterError(f"--variant {plain_of[weights]}: the name of {weights} plain decoding; choose another")
        variants = variants | {plain_of[weights]: {"weights": weights, "drafter": None}}
    for name, changes in variants.items():
        weights = str(changes.get("weights", rd.quantization.weights))
        settings = {key: value for key, value in changes.items() if key != "weights"}
        reference = "ar" if weights == rd.quantization.weights else plain_of[weights]
        methods[name] = ours(variant(engines[weights], **settings), reference)
    return methods


LLAMA_CPP_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval(llm.tokenize(b"Hello, world"))
"""


def llama_cpp_failure(gguf: Path) -> str | None:
    """Why llama-cpp-python cannot decode ``gguf`` here (None: it can), from a few tokens evaluated in
    a child process. A native build of llama.cpp on a CPU with AMX runs ggml's AMX matrix kernels,
    which crash some such machines (ggml-org/llama.cpp#20824): the benchmark would die with it."""
    import subprocess

    try:
        probe = subprocess.run(
            [sys.executable, "-c", LLAMA_CPP_PROBE, str(gguf)], capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not evaluate 3 tokens in 300 s"
    if probe.returncode == 0:
        return None
    crashed = probe.returncode < 0
    lines = probe.stderr.strip().splitlines()
    detail = f"exit {probe.returncode}" if not lines else lines[-1]
    if crashed:
        detail = f"it crashed (signal {-probe.returncode})"
    hint = ""
    if crashed and "AMX_INT8 = 1" in _llama_cpp_system_info():
        hint = (
            "; this build runs ggml's AMX kernels (ggml-org/llama.cpp#20824): rebuild without them, "
            "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
            "-DGGML_AVX512_BF16=ON' pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python"
        )
    return f"llama-cpp-python failed on {gguf.name}: {detail}{hint}"


def _llama_cpp_system_info() -> str:
    """llama.cpp's build features (``AVX512 = 1 | AMX_INT8 = 1 | ...``), read in a child process."""
    import subprocess

    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        return ""


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float | None:
    """This process's resident memory now, in MiB (Linux's ``/proc/self/statm``; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(pages * resource.getpagesize() / 2**20, 1)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def top2_gap(target, ids: list[int]) -> float:
    """The target's top-1 minus top-2 logit after ``ids``: a plain full forward, head in float32."""
    hidden = decoder_of(target)(input_ids=torch.tensor([ids], device=target.device)).last_hidden_state[0, -1]
    top = hidden_to_logits(target, hidden, float32=True).topk(2).values
    return float(top[0] - top[1])


def run_benchmark(
    rd: ReDrafter,
    prompts: list[Prompt],
    methods: list[str],
    max_new_tokens: int,
    out: Path,
    ablation_drafter: RecurrentDrafter | None = None,
    raw: bool = False,
    progress: bool = True,
    variants: dict[str, dict[str, int]] | None = None,
    gguf: Path | None = None,
    load: Callable[[str], ReDrafter] | None = None,
) -> dict:
    """Measure ``methods`` (and ``variants``, see :func:`make_methods`, with ``load``) on ``prompts``;
    write ``out/results.json`` and the plots; return the results."""
    if "ar" not in methods:
        methods = ["ar", *methods]  # the reference for speed and for identical output
    counter = ForwardCounter(rd.target)
    try:
        runners = make_methods(rd, methods, max_new_tokens, ablation_drafter, counter, variants, gguf, load)
        methods = list(runners)
        meter = EnergyMeter(rd.target.device)
        records = _measure(rd, prompts, methods, runners, raw, progress, meter)
    finally:
        counter.close()
    results = summarize(rd, methods, records, max_new_tokens)
    results["config"]["energy"] = meter.source
    for name, runner in runners.items():  # what an adaptive method measured: tree and plain steps' rates, counts
        if runner.engine is not None and runner.engine.decoder.policy is not None:
            results["methods"][name]["policy"] = runner.engine.decoder.policy.table()
        if runner.reference != "ar":  # on other weights: held to, and measured against, plain decoding with them
            results["methods"][name]["reference"] = runner.reference
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    plot_speedup(results, out / "speedup.png")
    plot_latency(results, out / "latency.png")
    if "redrafter" in methods:
        plot_acceptance(records, out / "acceptance.png")
    return results


def _measure(
    rd: ReDrafter,
    prompts: list[Prompt],
    methods: list[str],
    runners: dict[str, Method],
    raw: bool,
    progress: bool,
    meter: EnergyMeter | None = None,
) -> list[dict]:
    """Warm every method up, then run them all on each prompt, in an order rotating per prompt, each
    run's process CPU time (and energy, with a ``meter``) taken around it; then (untimed) replay each
    drafting method along its reference's output (``ar``'s, or plain decoding's with its weights)."""
    encoded = [rd.encode(p.text, raw) for p in prompts]
    for runner in runners.values():
        if runner.engine is not None and runner.engine.compile:  # a graph per shape, none inside a timed run
            runner.engine.decoder.warm_up(max_rows=1)
        runner.run(encoded[0][:64])
    records = []
    bar = tqdm(total=len(prompts) * len(methods), desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        order = methods[index % len(methods) :] + methods[: index % len(methods)]
        runs = {}
        for name in order:
            cpu, energy = time.process_time(), meter.read() if meter else None
            runs[name] = runners[name].run(ids)
            runs[name].cpu_seconds = time.process_time() - cpu
            runs[name].joules = meter.since(energy) if meter else None
            bar.update(1)
        record = prompt_record(rd.target, prompt, ids, runners, runs)
        for name in methods:
            engine, reference = runners[name].engine, runs[runners[name].reference]
            if engine is not None:
                record["methods"][name]["replayed_steps"] = len(engine.decoder.replay(ids, reference.token_ids))
        records.append(record)
        bar.set_postfix_str(f"redrafter/ar {_ratio(records, 'redrafter', 'ar'):.2f}x" if "redrafter" in runs else "")
    bar.close()
    return records


def prompt_record(target, prompt: Prompt, ids: list[int], runners: dict[str, Method], runs: dict[str, Run]) -> dict:
    """Per-prompt statistics of every method, and where it first differs from its reference: ``ar``,
    or for a method on other weights plain decoding with those (:attr:`Method.reference`)."""
    record = {"question_id": prompt.question_id, "category": prompt.category, "prompt_tokens": len(ids), "methods": {}}
    for name, method in runners.items():
        run = runs[name]
        reference = runs[method.reference].token_ids
        entry = {
            "new_tokens": len(run.token_ids),
            "seconds": round(run.seconds, 4),
            "first_token_seconds": round(run.first_token_seconds, 4),
            "cpu_seconds": round(run.cpu_seconds, 4),
            "joules": None if run.joules is None else round(run.joules, 4),
            "steps": run.steps,
            "tokens_per_step": round(len(run.token_ids) / max(1, run.steps), 4),
        }
        if run.accepted is not None:
            # The prompt's prefill (always one token) is not a speculative step: left out.
            entry["accepted_histogram"] = {str(k): v for k, v in sorted(Counter(run.accepted[1:]).items())}
        diff = first_difference(run.token_ids, reference)
        entry["identical"] = diff is None
        if method.reference != "ar":
            entry["reference"] = method.reference
        if diff is not None:
            gap = top2_gap(method.target or target, ids + reference[:diff]) if diff < len(reference) else None
            entry.update(
                first_difference=diff,
                top2_gap=None if gap is None else round(gap, 4),
                near_tie=gap is not None and gap <= NEAR_TIE,
            )
        record["methods"][name] = entry
    return record


def _totals(records: list[dict], method: str, category: str | None = None) -> dict:
    """A method's sums over the prompts (of one category); ``replayed_tokens_per_step`` for a
    drafting method: its reference's tokens (``ar``'s) over the steps its drafts take replayed along them."""
    chosen = [r for r in records if category is None or r["category"] == category]
    rows = [r["methods"][method] for r in chosen]
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    joules = [row.get("joules") for row in rows]
    totals = {
        "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
        "tokens_per_step": round(tokens / steps, 4) if steps else 0.0,
        "seconds": round(seconds, 3),
        "new_tokens": tokens,
        "cpu_seconds_per_token": round(sum(row.get("cpu_seconds", 0.0) for row in rows) / tokens, 5) if tokens else 0.0,
        "joules_per_token": round(sum(joules) / tokens, 5) if tokens and None not in joules else None,
        **latency_percentiles(rows),
    }
    replayed_steps = sum(row.get("replayed_steps", 0) for row in rows)
    if replayed_steps:
        reference = rows[0].get("reference", "ar")
        totals["replayed_tokens_per_step"] = round(
            sum(r["methods"][reference]["new_tokens"] for r in chosen) / replayed_steps, 4
        )
    return totals


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_percentiles(rows: list[dict]) -> dict:
    """Across prompts: time to first token and time per output token after it (``(seconds - first
    token) / (tokens - 1)``, a prompt with one token has none), p50 and p99, in milliseconds."""
    first = [1000 * row["first_token_seconds"] for row in rows if "first_token_seconds" in row]
    per_token = [
        1000 * (row["seconds"] - row["first_token_seconds"]) / (row["new_tokens"] - 1)
        for row in rows
        if "first_token_seconds" in row and row["new_tokens"] > 1
    ]
    result = {}
    for name, values in [("ttft", first), ("tpot", per_token)]:
        for q in (50, 99):
            result[f"{name}_p{q}_ms"] = round(percentile(values, q), 3) if values else None
    return result


def _ratio(records: list[dict], method: str, base: str, category: str | None = None) -> float:
    base_tps = _totals(records, base, category)["tokens_per_second"]
    return _totals(records, method, category)["tokens_per_second"] / base_tps if base_tps else 0.0


def summarize(rd: ReDrafter, methods: list[str], records: list[dict], max_new_tokens: int) -> dict:
    """The ``results.json`` object (its shape is read by outside tools: keep it stable)."""
    main = "redrafter" if "redrafter" in methods else methods[-1]
    categories = sorted({r["category"] for r in records})
    return {
        "config": {
            "model": str(getattr(rd.target.config, "_name_or_path", "")),
            "drafter": None if rd.drafter is None else rd.drafter.config.__dict__,
            "dtype": str(rd.target.dtype).removeprefix("torch."),
            "weights": rd.quantization.weights,
            "drafter_weights": rd.drafter_weights,
            "adaptive": rd.adaptive,
            "lone_tree": rd.lone_tree,
            "step_kinds": list(rd.decoder.kinds) if rd.decoder.policy is not None else ["tree"],
            "quick_argmax": rd.argmax_head is not None,
            "compile": rd.compile,
            "quantization": rd.quantization.to_json(),
            "peak_rss_mb": peak_rss_mb(),
            "beams": rd.num_beams,
            "draft_len": rd.draft_len,
            "lookup_len": rd.lookup_len,
            "ngram_len": rd.ngram_len,
            "ngram_entries": 0 if rd.drafter is None or rd.drafter.ngrams is None else len(rd.drafter.ngrams),
            "tree_nodes": rd.tree_nodes,
            "lookup_nodes": rd.lookup_nodes,
            "drafter_guess": rd.drafter_guess,
            "max_new_tokens": max_new_tokens,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(rd.target.device),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if rd.target.device.type == "cuda" else None,
            "prompts": len(records),
        },
        "methods": {m: _totals(records, m) for m in methods},
        "summary": {
            "speedup": round(_ratio(records, main, "ar"), 4),
            "speedup_vs_hf": round(_ratio(records, main, "hf"), 4) if "hf" in methods else None,
            "tokens_per_step": _totals(records, main)["tokens_per_step"],
            "replayed_tokens_per_step": _totals(records, main).get("replayed_tokens_per_step"),
            "identical": round(sum(r["methods"][main]["identical"] for r in records) / len(records), 4),
            "different": sum(1 for r in records if not r["methods"][main]["identical"]),
            "differences_on_near_ties": sum(
                1 for r in records if not r["methods"][main]["identical"] and r["methods"][main]["near_tie"]
            ),
        },
        "per_category": {
            c: {
                "speedup": round(_ratio(records, main, "ar", c), 4),
                "tokens_per_step": _totals(records, main, c)["tokens_per_step"],
                "replayed_tokens_per_step": _totals(records, main, c).get("replayed_tokens_per_step"),
                "tokens_per_second": _totals(records, main, c)["tokens_per_second"],
                "methods": {m: round(_ratio(records, m, "ar", c), 4) for m in methods},
            }
            for c in categories
        },
        "prompts": records,
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(results: dict, path: Path) -> None:
    """Speedup over ``ar`` per category (and overall), one bar per method."""
    plt = _plt()
    categories = list(results["per_category"]) + ["overall"]
    methods = list(results["methods"])
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(categories)), 4))
    width = 0.8 / len(methods)
    ar_tps = results["methods"]["ar"]["tokens_per_second"]
    for k, method in enumerate(methods):
        values = [results["per_category"][c]["methods"][method] for c in categories[:-1]]
        values.append(results["methods"][method]["tokens_per_second"] / ar_tps if ar_tps else 0)
        axis.bar([i + k * width for i in range(len(categories))], values, width, label=method)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=30, ha="right")
    axis.set_ylabel("tokens/s relative to ar")
    c = results["config"]
    dynamic = f", {c['tree_nodes']} drafted nodes" if c.get("tree_nodes") else ""
    looked_up = f"lookup {c['lookup_len']}, n-grams {c.get('ngram_len', 0)}"
    if c.get("lookup_nodes"):
        looked_up = f"confidence tree of up to {c['lookup_nodes']} nodes"
        looked_up += " with the drafter's guess" if c.get("drafter_guess") else ""
    axis.set_title(
        f"speedup over autoregressive decoding ({c['dtype']}, {c.get('weights', 'float')} weights, "
        f"{c['device']}, W={c['beams']}, L={c['draft_len']}, {looked_up}{dynamic})"
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)


def plot_acceptance(records: list[dict], path: Path) -> None:
    """Histogram of tokens emitted per decoding step by ``redrafter`` (the prefill left out)."""
    plt = _plt()
    counts: Counter = Counter()
    for record in records:
        for k, v in record["methods"]["redrafter"].get("accepted_histogram", {}).items():
            counts[int(k)] += v
    figure, axis = plt.subplots(figsize=(6, 4))
    keys = sorted(counts)
    axis.bar(keys, [counts[k] for k in keys])
    axis.set(xlabel="tokens emitted by one target forward", ylabel="steps", title="redrafter acceptance")
    figure.tight_layout()
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)


def plot_latency(results: dict, path: Path) -> None:
    """Two panels, one bar pair per method: time to first token, and time per output token after it
    (p50 and p99 across prompts)."""
    plt = _plt()
    methods = list(results["methods"])
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(methods)), 4))
    for axis, name, title in [
        (axes[0], "ttft", "time to first token"),
        (axes[1], "tpot", "time per output token after the first"),
    ]:
        for k, q in enumerate((50, 99)):
            values = [results["methods"][m][f"{name}_p{q}_ms"] or 0 for m in methods]
            axis.bar([i + 0.4 * k for i in range(len(methods))], values, 0.4, label=f"p{q}")
        axis.set_xticks([i + 0.2 for i in range(len(methods))], methods, rotation=30, ha="right")
        axis.set(ylabel="ms", title=title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)


def _throughput(engine: ReDrafter, batches: list[list[list[int]]], max_new_tokens: int) -> dict:
    """Tokens/s of ``engine`` over ``batches`` of prompt ids (each batch decoded together)."""
    tokens, seconds, steps = 0, 0.0, 0
    for batch in batches:
        start = time.perf_counter()
        results = engine.generate_ids(batch, max_new_tokens)
        seconds += time.perf_counter() - start
        tokens += sum(r.new_tokens for r in results)
        steps += max(r.steps for r in results)
    return {
        "tokens_per_second": round(tokens / seconds, 3),
        "new_tokens": tokens,
        "seconds": round(seconds, 3),
        "forwards": steps,
    }


def _drafter_nodes(num_beams: int, draft_len: int, tree_nodes: int) -> int:
    """The most tree nodes the drafter's beams take (root excluded): ``W (L - 1)``, or ``T`` of them."""
    most = num_beams * (draft_len - 1)
    return min(tree_nodes, most) if tree_nodes else most


def run_sweep(
    rd: ReDrafter,
    encoded: list[list[int]],
    beams: list[int],
    draft_lens: list[int],
    max_new_tokens: int,
    out: Path,
    progress: bool = True,
) -> dict:
    """Tokens/s of every tree shape W x L (and of ``ar``), interleaved per prompt; ``sweep.json``/``.png``."""
    if rd.drafter is None:
        raise RedrafterError("--sweep needs a drafter (--drafter FOLDER)")
    engines = {"ar": plain_engine(rd)}
    for w in beams:
        for length in draft_lens:
            engines[f"W{w}-L{length}"] = variant(rd, num_beams=w, draft_len=length)
    for engine in engines.values():
        engine.generate_ids([encoded[0][:64]], 8)  # warm-up
    rows = {name: {"tokens": 0, "seconds": 0.0, "steps": 0} for name in engines}
    bar = tqdm(total=len(encoded) * len(engines), desc="sweep", unit="run", disable=not progress)
    for ids in encoded:
        for name, engine in engines.items():
            result = engine.generate_ids([ids], max_new_tokens)[0]
            rows[name]["tokens"] += result.new_tokens
            rows[name]["seconds"] += result.seconds
            rows[name]["steps"] += result.steps
            bar.update(1)
    bar.close()
    shapes = []
    ar_tps = rows["ar"]["tokens"] / rows["ar"]["seconds"]
    # The lookup beams at their longest start (the context beam grows on full accepts; either may be shorter).
    lookup_nodes = max(0, rd.lookup_len - 1) + max(0, rd.ngram_len - 1)
    for name, row in rows.items():
        if name == "ar":
            continue
        w, length = (int(x[1:]) for x in name.split("-"))
        tps = row["tokens"] / row["seconds"]
        shapes.append(
            {
                "beams": w,
                "draft_len": length,
                "tree_size": 1 + _drafter_nodes(w, length, rd.tree_nodes) + lookup_nodes,
                "tokens_per_second": round(tps, 3),
                "tokens_per_step": round(row["tokens"] / row["steps"], 4),
                "speedup": round(tps / ar_tps, 4),
            }
        )
    best = max(shapes, key=lambda s: s["tokens_per_second"])
    sweep = {
        "ar_tokens_per_second": round(ar_tps, 3),
        "lookup_len": rd.lookup_len,
        "ngram_len": rd.ngram_len,
        "tree_nodes": rd.tree_nodes,
        "shapes": shapes,
        "best": best,
        "prompts": len(encoded),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", sweep)
    plt = _plt()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for w in beams:
        points = sorted((s["tree_size"], s["tokens_per_second"], s["draft_len"]) for s in shapes if s["beams"] == w)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"W={w}")
        for size, tps, length in points:
            axis.annotate(f"L={length}", (size, tps), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.axhline(ar_tps, color="grey", linestyle="--", label="ar")
    axis.set(
        xlabel=f"tree size 1 + drafter nodes + up to {lookup_nodes} lookup (tokens verified a step, lookups at start)",
        ylabel="tokens/s",
        title="tokens/s against tree shape",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(out / "sweep.png", lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)
    return sweep


def run_batch_sweep(
    rd: ReDrafter, encoded: list[list[int]], batch_sizes: list[int], max_new_tokens: int, out: Path
) -> dict:
    """Tokens/s against batch size for ``redrafter`` and ``ar``; ``batch.json``/``batch.png``."""
    engines = {"ar": plain_engine(rd)}
    if rd.drafter is not None:
        engines["redrafter"] = rd
    table: dict[str, dict[str, dict]] = {name: {} for name in engines}
    for size in batch_sizes:
        batches = [encoded[i : i + size] for i in range(0, len(encoded), size)]
        for name, engine in engines.items():
            engine.generate_ids(batches[0][:size], 8)  # warm-up at this shape
            table[name][str(size)] = _throughput(engine, batches, max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "batch.json", {"batch_sizes": batch_sizes, "methods": table, "prompts": len(encoded)})
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, rows in table.items():
        axis.plot(batch_sizes, [rows[str(b)]["tokens_per_second"] for b in batch_sizes], marker="o", label=name)
    axis.set(xlabel="batch size", ylabel="tokens/s (all rows)", title="throughput against batch size")
    axis.legend()
    figure.tight_layout()
    atomic_write(out / "batch.png", lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)
    return table


def run_profile(rd: ReDrafter, encoded: list[list[int]], max_new_tokens: int, out: Path) -> dict:
    """Where a decode step's time goes: milliseconds per step and stage, ``redrafter`` and ``ar``.

    The device is synchronised around every stage (see :class:`redrafter.decode.StageClock`);
    ``prefill and other`` is the rest of the wall-clock time (prompt prefill, API overhead).
    ``redrafter`` verifies a tree every step here (an adaptive engine's plain steps would blur the
    tree step's stages). Writes ``profile.json``.
    """
    engines = {"ar": plain_engine(rd)}
    if rd.drafter is not None:
        engines["redrafter"] = variant(rd, adaptive=False)
    table = {}
    for name, engine in engines.items():
        engine.generate_ids([encoded[0][:64]], 8)  # warm-up
        clock = engine.decoder.clock = StageClock()
        start = time.perf_counter()
        new_tokens = sum(engine.generate_ids([ids], max_new_tokens)[0].new_tokens for ids in encoded)
        total = time.perf_counter() - start
        engine.decoder.clock = None
        steps = max(1, clock.steps)
        stages = {k: round(1000 * v / steps, 3) for k, v in clock.seconds.items()}
        stages["prefill and other"] = round(1000 * total / steps - sum(stages.values()), 3)
        table[name] = {
            "steps": clock.steps,
            "new_tokens": new_tokens,
            "ms_per_step": round(1000 * total / steps, 3),
            "stages_ms_per_step": stages,
        }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "profile.json", {"prompts": len(encoded), "max_new_tokens": max_new_tokens, "methods": table})
    return table


def format_table(results: dict) -> str:
    """The terminal summary: one line per method, then per category."""
    ar = results["methods"]["ar"]["tokens_per_second"]

    def replayed(row: dict) -> str:
        value = row.get("replayed_tokens_per_step")
        return f"{value:>13.2f}" if value is not None else f"{'-':>13}"

    def ms(value: float | None, width: int) -> str:
        return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

    header = (
        f"{'tokens/s':>10}{'speedup':>9}{'tok/step':>10}{'on ar text':>13}{'tokens':>9}{'seconds':>10}"
        f"{'TTFT p50':>10}{'ms/tok p50':>11}{'p99':>8}{'CPU s/tok':>11}"
    )
    lines = [f"{'method':<18}{header}"]
    for name, row in results["methods"].items():
        lines.append(
            f"{name:<18}{row['tokens_per_second']:>10.2f}{row['tokens_per_second'] / ar:>8.2f}x"
            f"{row['tokens_per_step']:>10.2f}{replayed(row)}{row['new_tokens']:>9}{row['seconds']:>10.1f}"
            f"{ms(row['ttft_p50_ms'], 10)}{ms(row['tpot_p50_ms'], 11)}{ms(row['tpot_p99_ms'], 8)}"
            f"{row['cpu_seconds_per_token']:>11.4f}"
        )
    for name, row in results["methods"].items():
        if "reference" in row and row["reference"] != name:
            reference = results["methods"][row["reference"]]["tokens_per_second"]
            lines.append(f"{name:<18}{row['tokens_per_second'] / reference:>18.2f}x {row['reference']}")
    lines.append("")
    lines.append(f"{'category':<18}{'speedup':>9}{'tok/step':>10}{'on ar text':>13}{'tokens/s':>10}")
    for name, row in results["per_category"].items():
        lines.append(
            f"{name:<18}{row['speedup']:>8.2f}x{row['tokens_per_step']:>10.2f}{replayed(row)}"
            f"{row['tokens_per_second']:>10.2f}"
        )
    s = results["summary"]
    energy = results["config"].get("energy", "")
    lines.append("")
    lines.append(
        "TTFT: time to first token; ms/tok: time per output token after it (p50, p99 across prompts); "
        f"CPU s/tok: process CPU seconds (all threads) per token; energy: {energy}"
    )
    lines.append(
        "tok/step on ar text: the same drafts replayed along ar's output (teacher-forced), "
        "free of where low-precision near-ties sent each output"
    )
    lines.append(
        f"identical to ar: {s['identical']:.0%} of prompts; {s['different']} differ, "
        f"{s['differences_on_near_ties']} of them first on a near-tie of the target's top-2 logits (results.json)"
    )
    return "\n".join(lines)


@torch.inference_mode()
def run_cost_curve(
    model: str,
    dtype: torch.dtype,
    device: str,
    sizes: list[int],
    out: Path,
    context: int = 256,
    repeats: int = 15,
) -> dict:
    """Milliseconds of one target forward of ``n`` tokens (after ``context`` cached ones, fewer if the
    model's context is short; the head and exact argmax included, as a decode step runs them, with
    the file's quick argmax head where :func:`~redrafter.quant.gguf_argmax_head` makes one) for every
    ``n`` in ``sizes`` and every weight precision; the precisions and sizes are interleaved, medians
    reported.
    Writes ``cost_curve.json`` and ``cost_curve.png``."""
    targets, heads = {}, {}
    for weights in WEIGHTS:
        if weights != "float" and quantization_refusal(device, dtype, weights) is not None:
            continue  # not on this machine (w4a8 without AVX-512 VNNI, say)
        target, _ = load_target(model, dtype=dtype, device=device)
        quantize_target(target, weights, gguf_source(model))
        targets[weights], heads[weights] = target, gguf_argmax_head(target, gguf_source(model), weights)
    # Each series: a target and its forward as the decode loop runs it; float weights also unpacked
    # where the loop packs them (PackedLinear).
    series = {weights: (target, target_forward(target, packed=None)) for weights, target in targets.items()}
    if packed_refusal(targets["float"]) is None:
        series["float-unpacked"] = (targets["float"], target_forward(targets["float"], packed=False))
    config = next(iter(targets.values())).config
    context = min(context, context_limit(config) - max(sizes) - 1)  # a short-context model: fewer cached
    if context < 1:
        raise RedrafterError(f"--cost-curve: {max(sizes)} tokens do not fit the model's context")
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, context + max(sizes)), generator=generator).to(device)
    caches = {}
    for weights, target in targets.items():
        caches[weights] = TreeKVCache(config.num_hidden_layers, capacity=context + max(sizes))
        positions = torch.arange(context, device=device)[None]
        causal = torch.ones(context, context, dtype=torch.bool, device=device).tril()[None]
        target_forward(target)(prompt[:, :context], positions, additive_mask(causal, dtype), caches[weights])
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in series}
    argmax_times: dict[str, dict[int, list[float]]] = {h: {n: [] for n in sizes} for h in ("quick", "float")}

    def clock(device: torch.device) -> float:
        """Milliseconds on the wall clock once ``device``'s queued work is done."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000 * time.perf_counter()

    for repeat in range(repeats + 2):  # the first two rounds warm up
        for n in sizes:
            tokens = prompt[:, context : context + n]
            positions = torch.arange(context, context + n, device=device)[None]
            mask = torch.zeros(1, 1, n, context + n, dtype=dtype, device=device)
            for name, (target, forward) in series.items():
                weights = name.removesuffix("-unpacked")
                start = clock(target.device)
                hidden = forward(tokens, positions, mask, caches[weights])
                middle = clock(target.device)
                exact_argmax(target, hidden, argmax_head=heads[weights], head=forward_head(forward))
                end = clock(target.device)
                if repeat >= 2:
                    times[name][n].append(end - start)
                    if name == "float" and heads[weights] is not None:  # the head alone, both ways
                        argmax_times["quick"][n].append(end - middle)
                        exact_argmax(target, hidden)
                        argmax_times["float"][n].append(clock(target.device) - end)
                caches[weights].crop(-n)

    def medians(table: dict[str, dict[int, list[float]]]) -> dict[str, dict[str, float]]:
        return {k: {str(n): round(sorted(t)[len(t) // 2], 3) for n, t in row.items() if t} for k, row in table.items()}

    curve = medians(times)
    result = {
        "context": context,
        "repeats": repeats,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "quick_argmax": {w: head is not None for w, head in heads.items()},
        "ms_per_forward": curve,
        # The head and exact argmax alone (float weights' hidden states), through the quick head and
        # the float head: {} where the file has no quick head.
        "ms_argmax": {k: v for k, v in medians(argmax_times).items() if v},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cost_curve.json", result)
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, row in curve.items():
        label = "float weights, unpacked" if name == "float-unpacked" else f"{name} weights"
        axis.plot(sizes, [row[str(n)] for n in sizes], marker="o", label=label)
    axis.set(
        xlabel="tokens in one target forward (tree size)",
        ylabel="ms per forward (head and argmax included)",
        title=f"cost of a forward after {context} cached tokens ({result['dtype']})",
    )
    axis.set_ylim(bottom=0)
    axis.legend()
    figure.tight_layout()
    atomic_write(out / "cost_curve.png", lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)
    return result
