"""The Python API: ``ReDrafter.from_pretrained("default").generate("Why is the sky blue?")``."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .confidence import grid_refusal
from .decode import STEP_KINDS, DrafterProposer, Proposer, SpeculativeDecoder, TreeKind, no_draft
from .drafter import RecurrentDrafter
from .errors import RedrafterError
from .guess import DrafterGuess
from .lean_decoder import compile_refusal, lean_support, packed_refusal
from .models import context_limit, gguf_source, load_target
from .quant import (
    WEIGHTS,
    ArgmaxHead,
    QuantizationReport,
    check_quantizable,
    drafter_packable,
    gguf_argmax_head,
    gguf_stores_int4,
    lacks_half_gemm,
    packs_float32_copies,
    quantization_refusal,
    quantize_drafter,
    quantize_target,
)
from .sampling import SamplingParams
from .step_policy import SpeculationPolicy

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


@dataclass(frozen=True)
class TreeShape:
    """What one step drafts: keyword arguments of :class:`ReDrafter` (see there)."""

    num_beams: int
    draft_len: int
    lookup_len: int
    ngram_len: int
    tree_nodes: int
    lookup_nodes: int = 0


# The default tree per weight precision (--weights), each measured fastest for its precision on the
# bundled prompt set (not a benchmark's; README "Weights at their own precision"): on this CPU a
# forward of n tokens costs far more per token with the int8 and int4 kernels than with float
# weights (a 12-token forward is 2.1 single ones with int4, 1.3 with bfloat16), so they take small trees.
# With int4 and the lean forward one drafter beam beat two (74.8 against 71.0 tokens/s on the bundled
# prompts, docs/lean/; it had tied before, 52.6 against 52.2). On a Zen 4 machine the int4 lookup beam
# went from 6 to 3 tokens: chosen on MT-Bench (16 prompts, 82.1 against 71.4 tokens/s every step),
# reported on Spec-Bench (1.24x int4 ar against 1.22x, adaptive), docs/small-tree/. w4a8 takes int4's
# shape: on MT-Bench (8 prompts, 128 tokens, adaptive) 2 and 4 beams gave 79.4 and 80.6 tokens/s against
# 75.9 in one run, 75.1 (4 beams) against ar's 66.2 in the next, and 4 beams every step lost to ar
# (59.3 against 66.5 tokens/s; the adaptive engine mostly ran the small tree): no clear winner (docs/w4a8/).
# With fused w4a8 layers a plain step got twice as fast and each extra token in a forward costs about a
# tenth of one, so w4a8 drafts one token less: on 16 MT-Bench prompts (128 tokens, adaptive) 161.8 and
# 168.4 tokens/s against 157.8 and 152.7 in two runs; 2 lookup tokens instead of 3 gave 166.5 against
# 161.8, 4 gave 163.4 (docs/fused-layer/). Once the rest of a step got cheaper (Session 31), that drafted
# token cost more than it brought: 0.8 ms of drafting and a tree node a step for 0.16 tokens a step that
# the lookup beams did not already hold (38% of its drafts accepted), so w4a8 verifies the lookup beams
# alone (num_beams 0; --beams 1 drafts the token again): on 40 MT-Bench prompts (256 tokens) 226.1
# against 215.2 tokens/s, ar 160.8 (docs/host-steps/).
DEFAULT_SHAPES = {
    "float": TreeShape(num_beams=6, draft_len=4, lookup_len=12, ngram_len=4, tree_nodes=9),
    "int8": TreeShape(num_beams=2, draft_len=3, lookup_len=6, ngram_len=3, tree_nodes=0),
    "int4": TreeShape(num_beams=1, draft_len=3, lookup_len=3, ngram_len=3, tree_nodes=0),
    "w4a8": TreeShape(num_beams=0, draft_len=2, lookup_len=3, ngram_len=3, tree_nodes=0, lookup_nodes=12),
}
# w4a8 verifies a confidence tree of up to 12 nodes instead of its two lookup beams (--lookup-nodes,
# redrafter.confidence), where the drafter's n-gram table holds a confidence grid: fewer nodes a step
# for nearly the same tokens. Chosen on 24 MT-Bench prompts (256 tokens, one run: 297.4 against 288.7
# tokens/s, ar 193.6), reported on Spec-Bench's own five categories (30 prompts, no MT-Bench one: 217.9
# against 209.3, 1.43x against 1.37x ar; docs/confidence/).
# A forward of n tokens against one with w4a8 weights, for the confidence tree's size: forward and
# certified argmax after 400 cached tokens on a 2-core Xeon (AVX-512 VNNI; 1.0, 1.024, 1.128, 1.250,
# 1.389, 1.542, 1.786, 1.901, 2.240 for 1 to 8 and 10 tokens, 9 between; docs/confidence/cost.txt),
# times 0.81 plus 0.19: the rest of a plain step (a fifth of it in the loop's profile) added alike.
NODE_COSTS = (1.0, 1.019, 1.104, 1.203, 1.315, 1.439, 1.637, 1.730, 1.866, 2.004)
# The same over several rows: a decode step with n tokens a row over B rows against a plain step over
# them, keyed by B (redrafter.confidence.curve_at interpolates between): whole steps of the decode loop
# (the lookup, the tree's packing and verification included) on 2 to 16 MT-Bench prompts decoded
# together on the same Xeon, the means of two runs of docs/batch-tree/loop_cost.py (loop_cost.txt).
# Over 16 rows a second token a row costs 0.87 of a plain step: the forward is no longer bound by
# streaming the weights.
BATCH_NODE_COSTS = {
    1: NODE_COSTS,
    2: (1.0, 1.307, 1.628, 1.839, 2.180),
    4: (1.0, 1.594, 2.162, 2.776, 3.428),
    8: (1.0, 1.757, 2.490, 3.224, 3.985),
    16: (1.0, 1.867, 2.743, 3.580, 4.442),
}
# Whether the drafter's guess joins the confidence tree (drafter_guess), by the drafter's weights: where
# they are w4a8 its step is one kernel call (redrafter.guess). On 80 MT-Bench prompts (256 tokens, one
# run, side by side) 322.0 against 312.7 tokens/s, 2.34 against 2.11 tokens a forward; reported on 78
# Spec-Bench prompts: 238.5 against 233.3 (docs/guess/). Elsewhere its step runs through PyTorch (0.3 to
# 0.9 ms, more than it gains on this CPU: Session 35's replay).
DEFAULT_DRAFTER_GUESS = {"float": False, "int8": False, "int4": False, "w4a8": True}
DEFAULT_NGRAM_LEN = DEFAULT_SHAPES["float"].ngram_len
WEIGHT_CHOICES = ("auto", *DEFAULT_SHAPES)  # auto: default_weights
# The small tree an adaptive engine may also choose (--speculation adaptive): one drafter beam of one
# token and one token from each lookup beam, cut from the engine's own settings (never larger). Where a
# wide forward is dear it beats the tree: with int4 weights on Zen 4, Spec-Bench 1.25x over int4 ar with
# it against 1.07x without, MT-Bench 1.24x against 1.14x (docs/small-tree/); on an AVX2 CPU the small
# shape gave 1.20x against the int4 tree's 0.92x (docs/avx2/). With float weights there it tied on
# Spec-Bench (1.65x against 1.67x) and lost on MT-Bench (39.7 against 47.2 tokens/s), so it is on by
# default for int4 only (int8: not measured); and for float weights where oneDNN converts bfloat16 as
# it goes (default_small_tree).
DEFAULT_SMALL_TREE = {"float": False, "int8": False, "int4": True, "w4a8": True}
# Whether one running row takes the tree every step, the choice applying from two rows
# (SpeculationPolicy.lone_tree). With fused w4a8 steps a tree step costs about 1.5 plain ones, and the
# measured choice at one row lost to a tree every step on MT-Bench (16 prompts, 128 tokens: 163.6
# against 172.2 tokens/s; 12 prompts: 165.8 against 178.1), where this was chosen, and on 78 Spec-Bench
# prompts (164.3 against 172.2, a tree every step ahead in 12 of 13 categories, docs/fused-layer/).
# Not measured for the other precisions.
DEFAULT_LONE_TREE = {"float": False, "int8": False, "int4": False, "w4a8": True}


def default_small_tree(weights: str, device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether an adaptive engine also considers the small tree by default: :data:`DEFAULT_SMALL_TREE`,
    and with float weights also where oneDNN converts bfloat16 as it goes (plain AVX-512), so that wide
    products run on packed float32 copies (:func:`redrafter.quant.packs_float32_copies`). There, on an
    Ice Lake Xeon in bfloat16, chosen on 16 MT-Bench prompts (1.17x over ``ar`` with it against 1.12x
    without, 128 new tokens) and reported on 26 of Spec-Bench (1.13x against 1.08x; docs/avx2/)."""
    if DEFAULT_SMALL_TREE[weights]:
        return True
    return weights == "float" and packs_float32_copies(device) and lacks_half_gemm(device, dtype)


def default_weights(model: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> str:
    """What ``weights="auto"`` (the default) runs: where ``model`` is a GGUF file storing every linear
    layer of its decoder as Q4_0 or Q4_1 (:func:`redrafter.quant.gguf_stores_int4`: the kernels then run
    the file's own 4-bit values, the model in the file) on a CPU in bfloat16 or float16, ``"w4a8"`` where
    our kernel for it runs (AVX-512 VNNI, a C compiler: :mod:`redrafter.kernels`), else ``"int4"``;
    ``"float"`` otherwise. w4a8 over int4 was chosen on 8 MT-Bench prompts (``redrafter`` 75.9 against
    68.6 tokens/s, Ice Lake Xeon, 2 cores, 128 new tokens) and reported on 26 Spec-Bench prompts:
    ``redrafter`` 75.7 against 62.9 (1.20x), plain decoding 1.14x, output equal to plain decoding's
    token for token with both (docs/w4a8/). With int4 weights a step reads a
    quarter of the bytes: side by side on an Ice Lake Xeon (2 cores), ``redrafter`` gave 69.1 tokens/s
    against 43.2 with bfloat16 weights on 16 MT-Bench prompts (where this was chosen) and 58.8 against
    37.8 on 26 Spec-Bench prompts (docs/default-weights/); on an earlier machine 55.0 against 41.2 (MT-Bench)."""
    gguf = gguf_source(model)
    if gguf is None or dtype not in (torch.bfloat16, torch.float16) or quantization_refusal(device, dtype, "int4"):
        return "float"
    if not gguf_stores_int4(gguf):
        return "float"
    return "w4a8" if quantization_refusal(device, dtype, "w4a8") is None else "int4"


SMALL_SHAPE = TreeShape(num_beams=1, draft_len=2, lookup_len=2, ngram_len=2, tree_nodes=0)
# The drafter's weights per target precision on a CPU (--drafter-weights), each measured on MT-Bench's
# first 2 prompts per category (docs/drafter-weights/): with float weights the 6-beam tree drafts 6
# rows at a time, where the int4 kernel gains (75.5 against 79.7 ms a step) and the int8 one does not;
# the 1-beam int4 tree drafts one row, where int8 gained most (45.5 against 49.5 ms) and kept the
# acceptance whole. int8 weights take int4's choice (their 2-beam tree is as narrow), unmeasured.
# w4a8 targets draft through the w4a8 kernel too: on 12 MT-Bench prompts (128 tokens, Ice Lake Xeon)
# 154.3 against 147.9 tokens/s (adaptive), 2.10 against 2.08 tokens a step on ar's text (docs/fused-layer/).
# In float32 the drafter stays float (from_pretrained).
DEFAULT_DRAFTER_WEIGHTS = {"float": "int4", "int8": "int8", "int4": "int8", "w4a8": "w4a8"}
SHIPPED_DRAFTERS = Path(__file__).parent / "drafters"
DEFAULT_DRAFTER = SHIPPED_DRAFTERS / "smollm2-135m-instruct"


@dataclass
class Generation:
    """One prompt's output and statistics.

    Attributes:
        text: the decoded new text (special tokens skipped).
        token_ids: the generated token ids only (EOS included when reached).
        new_tokens: ``len(token_ids)``.
        steps: target forward passes, the prompt's prefill included.
        tokens_per_step: ``new_tokens / steps`` (1.0 for autoregressive decoding).
        seconds: wall time from the prefill to the last token.
        tokens_per_second: ``new_tokens / seconds``.
        accepted: tokens emitted by each step (the acceptance histogram's raw data).
        finish_reason: ``"eos"`` or ``"length"``.
        first_token_seconds: wall time from the prefill's start to the first token (time to first token).
    """

    text: str
    token_ids: list[int]
    new_tokens: int
    steps: int
    tokens_per_step: float
    seconds: float
    tokens_per_second: float
    accepted: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    first_token_seconds: float = 0.0

    def to_json(self) -> dict:
        """The ``--json`` object (stable key names that benchmarks and outside tools read)."""
        return asdict(self)


class GenerationStream:
    """Iterate to get text pieces as tokens are accepted; ``result`` holds the :class:`Generation` after."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._pieces


class ReDrafter:
    """A target model with (optionally) a recurrent drafter, ready to generate.

    Args:
        target: a Hugging Face causal LM that accepts 4D masks (checked by ``load_target``).
        tokenizer: its tokenizer.
        drafter: a drafter fitted to ``target``, or None for autoregressive decoding.
        num_beams: ``W``, beams drafted per step; 0: the drafter drafts nothing and the tree holds the
            lookup beams alone (context lookup and the drafter's n-gram table, prompt-lookup decoding in
            this loop): the default with w4a8 weights (:data:`DEFAULT_SHAPES`).
        draft_len: ``L``, tokens per beam (the root included), so at most ``L`` tokens per step.
        lookup_len: tokens of a context-lookup beam (copied from the prompt and output so far) added to
            the drafter's beams, its root included; 0 for none.
        ngram_len: tokens of a beam drafted from the drafter's corpus n-gram table
            (:mod:`redrafter.ngrams`), root included; 0 for none (also when the drafter has no table).
        tree_nodes: verify only the ``T`` most probable drafted prefixes that beam search held at
            any depth (a dynamic tree, :func:`redrafter.beam_search.beam_search`); 0 for the ``W``
            final beams.
        lookup_nodes: when above 0, verify each row's confidence tree of at most this many nodes
            (:mod:`redrafter.confidence`: the context's and the n-gram table's guesses, the most
            probable kept) instead of the context-lookup and n-gram beams; needs a drafter whose
            n-gram table holds a confidence grid (``redrafter ngrams`` fits one).
        drafter_guess: with ``num_beams`` 0 and ``lookup_nodes``, the drafter's most probable next token
            joins each confidence tree at its root, at the drafter's probability
            (:class:`redrafter.guess.DrafterGuess`: one kernel call with w4a8 drafter weights).
        quantization: how ``target``'s weights were quantized (:func:`redrafter.quant.quantize_target`).
        lean: run the target through :class:`redrafter.lean_decoder.LeanDecoder` where it covers the
            model (Llama, Mistral, Qwen2); False: through transformers' decoder.
        drafter_weights: ``"float"``, or ``"int8"``/``"int4"`` to draft with a weight-only quantized
            copy of the drafter (:func:`redrafter.quant.quantize_drafter`; CPU only).
        adaptive: choose per step between the tree, a small tree (:data:`SMALL_SHAPE`, with
            ``small_tree``) and a plain step from measured tokens per second
            (:class:`~redrafter.step_policy.SpeculationPolicy`); False: the tree every step.
        small_tree: with ``adaptive``, let the choice include the small tree (:data:`SMALL_SHAPE`,
            where it is smaller than the tree).
        lone_tree: with ``adaptive``, one running row takes the tree every step and the choice applies
            from two rows (:attr:`~redrafter.step_policy.SpeculationPolicy.lone_tree`, the server's too).
        argmax_head: a cheaper head for the greedy argmax's candidates
            (:class:`redrafter.quant.ArgmaxHead`, :func:`redrafter.quant.gguf_argmax_head`), or None.
        compile: run the lean forward through ``torch.compile``
            (:class:`redrafter.lean_decoder.CompiledDecoder`): minutes to compile at the first
            calls, then cheaper steps; needs ``lean`` and a model the lean forward covers.
        packed: the lean forward's float products on weights reordered once for oneDNN
            (:class:`redrafter.quant.PackedLinear`: faster steps, a second copy of those weights);
            None: where it applies (bfloat16 or float16 weights on a CPU with native products, or
            their float32 copies where oneDNN converts bfloat16 as it goes).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        tokenizer,
        drafter: RecurrentDrafter | None = None,
        num_beams: int = DEFAULT_SHAPES["float"].num_beams,
        draft_len: int = DEFAULT_SHAPES["float"].draft_len,
        lookup_len: int = DEFAULT_SHAPES["float"].lookup_len,
        ngram_len: int = DEFAULT_SHAPES["float"].ngram_len,
        tree_nodes: int = DEFAULT_SHAPES["float"].tree_nodes,
        lookup_nodes: int = DEFAULT_SHAPES["float"].lookup_nodes,
        drafter_guess: bool = False,
        quantization: QuantizationReport | None = None,
        lean: bool = True,
        drafter_weights: str = "float",
        adaptive: bool = True,
        small_tree: bool = False,
        lone_tree: bool = False,
        argmax_head: ArgmaxHead | None = None,
        compile: bool = False,
        packed: bool | None = None,
    ) -> None:
        if num_beams < 0:
            raise RedrafterError(f"--beams must be 0 or more, got {num_beams}")
        lookup_alone = max(lookup_len, ngram_len if drafter is not None and drafter.ngrams else 0, 2 * lookup_nodes)
        if num_beams == 0 and drafter is not None and lookup_alone < 2:
            raise RedrafterError(
                "--beams 0 verifies the lookup beams alone: give --lookup-len or --ngram-len of 2 or more, "
                "or --lookup-nodes"
            )
        if draft_len < 1:
            raise RedrafterError(f"--draft-len must be at least 1, got {draft_len}")
        if lookup_len < 0:
            raise RedrafterError(f"--lookup-len must be 0 or more, got {lookup_len}")
        if ngram_len < 0:
            raise RedrafterError(f"--ngram-len must be 0 or more, got {ngram_len}")
        if tree_nodes < 0:
            raise RedrafterError(f"--tree-nodes must be 0 or more, got {tree_nodes}")
        if lookup_nodes < 0:
            raise RedrafterError(f"--lookup-nodes must be 0 or more, got {lookup_nodes}")
        if lookup_nodes and drafter is not None and (refusal := grid_refusal(drafter.ngrams)) is not None:
            raise RedrafterError(
                f"--lookup-nodes needs a drafter whose n-gram table holds a confidence grid ({refusal}); "
                "give --lookup-nodes 0"
            )
        if drafter_weights not in WEIGHTS:
            raise RedrafterError(f"unknown drafter weights {drafter_weights!r}; choose one of {', '.join(WEIGHTS)}")
        if drafter_guess and drafter is not None and (num_beams or not lookup_nodes):
            raise RedrafterError(
                "--drafter-guess joins the drafter's guess to the confidence tree: it needs --beams 0 and "
                "--lookup-nodes (with beams the drafter's most probable token is in its tree already)"
            )
        if compile and (refusal := compile_refusal(target, lean)) is not None:
            raise RedrafterError(f"--compile: {refusal}")
        if packed and (refusal := packed_refusal(target, lean, compile)) is not None:
            raise RedrafterError(f"packed weights: {refusal}")
        self.target, self.tokenizer, self.drafter = target, tokenizer, drafter
        self.quantization = quantization or QuantizationReport("float")
        self.num_beams, self.draft_len, self.tree_nodes = num_beams, draft_len, tree_nodes
        self.lookup_len = lookup_len if drafter is not None else 0  # plain decoding stays plain
        self.lookup_nodes = lookup_nodes if drafter is not None else 0
        self.drafter_guess = drafter_guess and drafter is not None
        proposer: Proposer = no_draft
        small: TreeKind | None = None
        guess = None
        if drafter is not None:
            drafter.check_fits(target.config.hidden_size, target.config.vocab_size, target.config.num_hidden_layers)
            drafter.attach(target.get_input_embeddings(), target.get_output_embeddings()).to(
                device=target.device, dtype=target.dtype
            ).eval()
            drafting = quantize_drafter(drafter, drafter_weights) if num_beams or drafter_guess else drafter
            proposer = DrafterProposer(drafting, num_beams, draft_len, tree_nodes) if num_beams else no_draft
            guess = DrafterGuess(drafting) if self.drafter_guess else None
            shape = TreeShape(num_beams, draft_len, self.lookup_len, ngram_len, tree_nodes, self.lookup_nodes)
            small_shape = TreeShape(*(min(a, b) for a, b in zip(astuple(shape), astuple(SMALL_SHAPE), strict=True)))
            if adaptive and small_tree and num_beams and small_shape != shape:
                small_proposer = DrafterProposer(drafting, small_shape.num_beams, small_shape.draft_len)
                small = TreeKind(small_proposer, small_shape.lookup_len, small_shape.ngram_len)
        self.drafter_weights = drafter_weights if drafter is not None else "float"
        eos = target.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        ngrams = drafter.ngrams if drafter is not None else None
        self.lean, self.adaptive, self.small_tree, self.argmax_head = lean, adaptive, small_tree, argmax_head
        self.lone_tree = lone_tree
        self.compile, self.packed = bool(compile), packed
        policy = None
        if adaptive and drafter is not None:
            policy = SpeculationPolicy(kinds=STEP_KINDS[: 3 if small else 2], lone_tree=lone_tree)
        self.decoder = SpeculativeDecoder(
            target,
            proposer,
            eos_ids,
            self.lookup_len,
            ngrams,
            ngram_len,
            lean,
            policy,
            small,
            argmax_head,
            compile,
            packed,
            self.lookup_nodes,
            BATCH_NODE_COSTS,
            guess,
        )
        self.ngram_len = self.decoder.ngram_len  # 0 when there is no table

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "default",
        drafter: str | os.PathLike | RecurrentDrafter | None = "default",
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "cpu",
        weights: str = "auto",
        num_beams: int | None = None,
        draft_len: int | None = None,
        lookup_len: int | None = None,
        ngram_len: int | None = None,
        tree_nodes: int | None = None,
        lookup_nodes: int | None = None,
        drafter_guess: bool | None = None,
        drafter_weights: str | None = None,
        adaptive: bool = True,
        small_tree: bool | None = None,
        lone_tree: bool | None = None,
        quick_argmax: bool = True,
        compile: bool = False,
        packed: bool | None = None,
    ) -> ReDrafter:
        """Load a target (``"default"``, a ``.gguf`` file or a folder) and a drafter.

        ``drafter``: a drafter folder, ``"default"`` (the one shipped for the default model, if
        any; none otherwise) or ``None``/``"none"`` for autoregressive decoding.
        ``weights``: ``"float"`` (weights in ``dtype``), ``"int8"`` or ``"int4"``: the target's
        linear layers weight-only quantized (:mod:`redrafter.quant`; int4 from a Q4_0/Q4_1 GGUF
        runs the file's own 4-bit values); ``"w4a8"``: int4's codes times int8 activations
        (:mod:`redrafter.w4a8`); ``"auto"``: :func:`default_weights` (w4a8 or int4 for such a GGUF on
        a CPU, float otherwise). The tree settings left None take the defaults of
        ``weights`` (:data:`DEFAULT_SHAPES`), and ``drafter_weights`` (``"float"``, ``"int8"`` or
        ``"int4"``, the drafter's own linear layers) takes :data:`DEFAULT_DRAFTER_WEIGHTS` on a CPU
        and ``"float"`` elsewhere; ``small_tree`` left None takes :func:`default_small_tree`, and
        ``lone_tree`` :data:`DEFAULT_LONE_TREE`.
        ``quick_argmax``: greedy candidates from the file's own Q8_0 or 4-bit head where a GGUF holds
        one (:func:`redrafter.quant.gguf_argmax_head`; the winner is still chosen in float32 from the
        float head, :func:`redrafter.sampling.exact_argmax`).
        ``compile``: the target's lean forward through ``torch.compile`` (see :class:`ReDrafter`).
        ``packed``: weights reordered once for oneDNN (see :class:`ReDrafter`; None: where it applies);
        False also leaves int4 layers without their dequantized copies for prefills (``dense_prefill``
        of :func:`redrafter.quant.quantize_target`): the least memory.
        """
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise RedrafterError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        if weights not in WEIGHT_CHOICES:
            raise RedrafterError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
        if weights == "auto":
            weights = default_weights(model, device, dtype)
        default_drafter_weights = drafter_weights is None
        if drafter_weights is None:
            # The int kernels run float32 activations unvectorized (an int8 head of 49k rows: 25 ms
            # against 4.7 in bfloat16 on an AVX2 machine), so a float32 drafter stays float.
            kernels_run = quantization_refusal(device, dtype, "int8") is None and dtype != torch.float32
            drafter_weights = DEFAULT_DRAFTER_WEIGHTS[weights] if kernels_run else "float"
        for precision in {weights, drafter_weights} - {"float"}:  # refused before the model loads
            if precision not in WEIGHTS:
                raise RedrafterError(f"unknown weights {precision!r}; choose one of {', '.join(WEIGHTS)}")
            check_quantizable(device, dtype, precision)
        drafter = resolve_drafter(drafter, model)
        if default_drafter_weights and drafter is not None and not drafter_packable(drafter):
            drafter_weights = "float"  # a drafter of odd sizes keeps its float weights unless asked
        target, tokenizer = load_target(model, dtype=dtype, device=device)
        # Copies for prefills only where the eager lean forward runs them (a compiled one has its own graph).
        dense_prefill = False if compile or lean_support(target) is not None else packed
        quantization = quantize_target(target, weights, gguf_source(model), dense_prefill=dense_prefill)
        argmax_head = gguf_argmax_head(target, gguf_source(model), weights) if quick_argmax else None
        given = dict(
            num_beams=num_beams,
            draft_len=draft_len,
            lookup_len=lookup_len,
            ngram_len=ngram_len,
            tree_nodes=tree_nodes,
            lookup_nodes=lookup_nodes,
        )
        shape = asdict(DEFAULT_SHAPES[weights]) | {k: v for k, v in given.items() if v is not None}
        if lookup_nodes is None and (drafter is None or grid_refusal(drafter.ngrams) is not None):
            shape["lookup_nodes"] = 0  # a drafter without a confidence grid keeps the lookup beams
        if drafter_guess is None:
            drafter_guess = (
                DEFAULT_DRAFTER_GUESS[drafter_weights] and not shape["num_beams"] and shape["lookup_nodes"] > 0
            )
        return cls(
            target,
            tokenizer,
            drafter,
            **shape,
            drafter_guess=drafter_guess,
            quantization=quantization,
            drafter_weights=drafter_weights,
            adaptive=adaptive,
            small_tree=default_small_tree(weights, device, dtype) if small_tree is None else small_tree,
            lone_tree=DEFAULT_LONE_TREE[weights] if lone_tree is None else lone_tree,
            argmax_head=argmax_head,
            compile=compile,
            packed=packed,
        )

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: str, raw: bool = False) -> list[int]:
        """The prompt's token ids, through the chat template unless ``raw``."""
        if not prompt.strip():
            raise RedrafterError("the prompt is empty")
        if not raw and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        self.check_context(ids)
        return ids

    def check_context(self, ids: list[int]) -> None:
        """Raise :class:`RedrafterError` unless ``ids`` leave room in the context for a step's tree."""
        limit = context_limit(self.target.config)
        if len(ids) + max(self.draft_len, self.lookup_len, self.ngram_len, self.lookup_nodes + 1) >= limit:
            raise RedrafterError(f"the prompt has {len(ids)} tokens; the model's context is {limit}")

    # -- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 256,
        raw: bool = False,
        sampling: SamplingParams | None = None,
    ) -> Generation | list[Generation]:
        """Generate for one prompt (a :class:`Generation`) or a list (a list, in input order).

        ``sampling``: None for greedy decoding, else exact speculative sampling with its settings.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        results = self.generate_ids([self.encode(p, raw) for p in prompts], max_new_tokens, sampling)
        return results[0] if isinstance(prompt, str) else results

    def generate_ids(
        self, prompts: list[list[int]], max_new_tokens: int = 256, sampling: SamplingParams | None = None
    ) -> list[Generation]:
        """Generate from token id lists, decoded together as one batch."""
        stream = self._stream_ids(prompts, max_new_tokens, sampling)
        for _ in stream:
            pass
        return stream.results

    def generate_many(
        self,
        prompts: list[str],
        batch_size: int = 8,
        max_new_tokens: int = 256,
        raw: bool = False,
        sampling: SamplingParams | None = None,
        on_done=None,
    ) -> list[dict]:
        """Generate for many prompts, ``batch_size`` at a time; one JSON-ready dict per prompt, in order.

        A prompt that cannot be encoded (empty, longer than the context) gets ``{"index", "error"}``
        and the others go on. A batch that runs out of memory is split in halves and retried.
        ``on_done(n)`` is called as rows finish (for a progress bar).
        """
        results: list[dict | None] = [None] * len(prompts)
        encoded = []
        for index, prompt in enumerate(prompts):
            try:
                encoded.append((index, self.encode(prompt, raw)))
            except RedrafterError as error:
                results[index] = {"index": index, "error": str(error)}
                if on_done:
                    on_done(1)
        pending = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        while pending:
            batch = pending.pop(0)
            try:
                generations = self.generate_ids([ids for _, ids in batch], max_new_tokens, sampling)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if "memory" not in str(error).lower() and not isinstance(error, torch.OutOfMemoryError):
                    raise
                if len(batch) == 1:
                    raise RedrafterError("out of memory even for a batch of one prompt") from None
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                continue
            for (index, _), generation in zip(batch, generations, strict=True):
                results[index] = {"index": index, **generation.to_json()}
            if on_done:
                on_done(len(batch))
        return results

    def stream(
        self, prompt: str, max_new_tokens: int = 256, raw: bool = False, sampling: SamplingParams | None = None
    ) -> GenerationStream:
        """Text pieces as they are accepted; the stream's ``result`` holds the statistics after."""
        return GenerationStream(self._stream_text(self.encode(prompt, raw), max_new_tokens, sampling))

    def _stream_text(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams | None
    ) -> Iterator[str]:
        stream = self._stream_ids([prompt_ids], max_new_tokens, sampling)
        shown = ""
        for _ in stream:
            text = self.tokenizer.decode(stream.token_ids[0], skip_special_tokens=True)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for whole characters
                yield text[len(shown) :]
                shown = text
        result = stream.results[0]
        if len(result.text) > len(shown):
            yield result.text[len(shown) :]
        return result

    def _stream_ids(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None
    ) -> _IdStream:
        if max_new_tokens < 1:
            raise RedrafterError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            raise RedrafterError("no prompts")
        return _IdStream(self, prompts, max_new_tokens, sampling)


class _IdStream:
    """Runs the decode loop; iterating yields after each step; collects per-row statistics."""

    def __init__(
        self, rd: ReDrafter, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None
    ) -> None:
        self.rd, self.prompts, self.max_new_tokens, self.sampling = rd, prompts, max_new_tokens, sampling
        self.token_ids: list[list[int]] = [[] for _ in prompts]
        self.accepted: list[list[int]] = [[] for _ in prompts]
        self.seconds = [0.0] * len(prompts)
        self.first_token_seconds = [0.0] * len(prompts)
        self.finish = ["length"] * len(prompts)
        self.results: list[Generation] = []

    def __iter__(self) -> Iterator[None]:
        eos = self.rd.decoder.eos_token_ids
        start = time.perf_counter()
        for step in self.rd.decoder.decode(self.prompts, self.max_new_tokens, self.sampling):
            now = time.perf_counter() - start
            for row, tokens, done in zip(step.rows, step.tokens, step.finished, strict=True):
                if not self.token_ids[row]:
                    self.first_token_seconds[row] = now
                self.token_ids[row].extend(tokens)
                self.accepted[row].append(len(tokens))
                if done:
                    self.seconds[row] = now
                    self.finish[row] = "eos" if tokens and tokens[-1] in eos else "length"
            yield
        for row, ids in enumerate(self.token_ids):
            steps, seconds = len(self.accepted[row]), self.seconds[row]
            self.results.append(
                Generation(
                    text=self.rd.tokenizer.decode(ids, skip_special_tokens=True),
                    token_ids=ids,
                    new_tokens=len(ids),
                    steps=steps,
                    tokens_per_step=len(ids) / steps,
                    seconds=seconds,
                    tokens_per_second=len(ids) / seconds if seconds > 0 else 0.0,
                    accepted=self.accepted[row],
                    finish_reason=self.finish[row],
                    first_token_seconds=self.first_token_seconds[row],
                )
            )


def resolve_drafter(
    drafter: str | os.PathLike | RecurrentDrafter | None, model: str | os.PathLike
) -> RecurrentDrafter | None:
    """``"none"``/None -> None; ``"default"`` -> the shipped drafter for the default model, if any."""
    if isinstance(drafter, RecurrentDrafter):
        return drafter
    if drafter is None or str(drafter) == "none":
        return None
    if str(drafter) == "default":
        if str(model) != "default" or not (DEFAULT_DRAFTER / "config.json").is_file():
            return None
        drafter = DEFAULT_DRAFTER
    path = Path(drafter).expanduser()
    if not path.is_dir():
        raise RedrafterError(f"drafter not found: {drafter} (give a drafter folder, 'default' or 'none')")
    return RecurrentDrafter.from_pretrained(path)
