"""The speculative decode loop: draft, build the tree, verify in one target forward, keep the path.

One :class:`SpeculativeDecoder` step, for a batch of ``B`` rows with ``C`` cached positions:

1. the proposer drafts beams ``[B, W, L]`` from the target's features ``[B, F]`` (the hidden state,
   ``F = d``, or with it the outputs of the layers a drafter fuses) and last token ``[B]``;
   with ``lookup_len``, one context-lookup beam per row joins them, and with an n-gram table one
   beam drafted from the corpus's n-grams (:mod:`redrafter.lookup`, :mod:`redrafter.ngrams`), or
   with ``lookup_nodes`` instead of both beams each row's confidence tree (:mod:`redrafter.confidence`),
   where the drafter's own guess may join the lookups' at its root (:mod:`redrafter.guess`);
2. the beams become a packed prefix tree of ``N`` slots (:mod:`redrafter.tree`);
3. the target runs once over ``[B, N]`` with a ``[B, 1, N, C + N]`` mask and per-slot positions;
4. verification picks per row the accepted path and its bonus token (:mod:`redrafter.verify`), from
   the target's argmax (greedy) or one exact sample per node (:mod:`redrafter.sampling`);
5. the cache keeps the accepted path's entries only, in place (:mod:`redrafter.kv_cache`).

With no drafter the tree is the last token alone (``W = L = 1``): plain autoregressive decoding
through the same loop, cache and dtype, which makes it the honest baseline.

Rows of a batch may accept different numbers of tokens; the cache stays rectangular and each
row's surplus entries are masked out through ``context_valid``. A finished row (EOS or its token
budget) leaves the batch at once, and a new row can join between steps (:class:`RunningBatch`,
continuous batching for the server): it is prefilled alone, then merged into a left-padded cache.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from .beam_search import beam_search
from .confidence import ConfidenceTree, NodeCosts, grid_refusal
from .drafter import RecurrentDrafter
from .guess import DrafterGuess
from .head import cpu_head
from .kv_cache import TreeKVCache
from .lean_decoder import forward_head, target_forward
from .lookup import LookupBeams
from .models import attention_windows, context_limit, decoder_features, decoder_of
from .ngrams import NgramTable
from .sampling import SamplingParams, TokenChooser
from .step_policy import SpeculationPolicy
from .tree import build_tree, layer_masks, tree_allowed
from .verify import verify

# The kinds of step, by number (RunningBatch.step): a plain step, the tree, the small tree.
STEP_KINDS = ("plain", "tree", "small_tree")
# A token id no draft holds (drafts are ids >= 0 or PAD = -1): the target's choice past a known output.
UNKNOWN = -2


def _warm_up_prompts(vocab: int, rows: int, unequal: bool = False) -> list[list[int]]:
    """``rows`` prompts of 6 tokens from the middle of the vocabulary (special ones sit at its ends);
    ``unequal``: row ``i`` has ``6 + i`` tokens (a prefill that pads)."""
    return [[(vocab // 2 + 7 * i + k) % vocab for k in range(6 + i * unequal)] for i in range(rows)]


class Proposer(Protocol):
    """Anything that drafts beams: the recurrent drafter, or a test oracle."""

    def __call__(self, hidden: torch.Tensor, last_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``hidden [B, F]`` target features, ``last_token [B]``, ``positions [B]`` (of ``last_token``)
        -> ``[B, W, L]``. A proposer may name ``target_layers``: the decoder layers whose outputs
        follow the final hidden state in its features (:func:`redrafter.models.decoder_features`)."""


class DrafterProposer:
    """Beam search with a :class:`RecurrentDrafter`: ``W`` beams of ``L`` tokens, or with ``tree_nodes``
    the most probable drafted prefixes (see :func:`~redrafter.beam_search.beam_search`)."""

    def __init__(self, drafter: RecurrentDrafter, num_beams: int, draft_len: int, tree_nodes: int = 0) -> None:
        self.drafter, self.num_beams, self.draft_len = drafter, num_beams, draft_len
        self.tree_nodes = tree_nodes
        self.target_layers = drafter.target_layers

    def __call__(self, hidden: torch.Tensor, last_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return beam_search(self.drafter, hidden, last_token, self.num_beams, self.draft_len, self.tree_nodes)


@dataclass(frozen=True)
class TreeKind:
    """What a tree step verifies: the proposer's beams, and each row's lookup beams cut to
    ``lookup_len`` and ``ngram_len`` tokens (their root included; below 2: none; None: uncut,
    the rows' own lookup lengths and the decoder's ``ngram_len``)."""

    proposer: Proposer
    lookup_len: int | None = None
    ngram_len: int | None = None


def no_draft(hidden: torch.Tensor, last_token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The empty draft: ``[B, 1, 1]``, the last token only (autoregressive decoding)."""
    return last_token[:, None, None]


@dataclass
class StepOutput:
    """Tokens emitted in one step.

    Attributes:
        rows: original indices (into the prompt list) of the rows still active in this step.
        tokens: per active row, the list of token ids emitted (EOS included, nothing after it).
        finished: per active row, whether it finished in this step.
        nested: per smaller tree kind whose tree this step's tree holds, the tokens each active row
            would have emitted with it instead (:meth:`SpeculativeDecoder.nested_small_tree`).
    """

    rows: list[int]
    tokens: list[list[int]]
    finished: list[bool]
    nested: dict[int, list[int]] = field(default_factory=dict)


class StageClock:
    """Wall-clock seconds of each stage of the decode loop, summed over steps (a profiler).

    Attach one to a :class:`SpeculativeDecoder` (``decoder.clock = StageClock()``); it synchronises
    the device around every stage, so attach it only to measure.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[name] += time.perf_counter() - start


class SpeculativeDecoder:
    """Speculative decoding of any Hugging Face causal LM that accepts tree masks.

    Args:
        target: the target model (eval mode; see :func:`redrafter.models.check_tree_attention`).
        proposer: drafts beams; :func:`no_draft` for autoregressive decoding.
        eos_token_ids: ids that end a row (emitted, then the row stops).
        lookup_len: when above 1, add one context-lookup beam of this many tokens (its root
            included) per row to the proposer's beams (:mod:`redrafter.lookup`).
        ngrams: a corpus n-gram table (:mod:`redrafter.ngrams`) drafting one more beam per row of
            ``ngram_len`` tokens (its root included; below 2: none), or None.
        lookup_nodes: when above 0, the lookup drafts come as each row's confidence tree of at most
            this many nodes (:mod:`redrafter.confidence`, over the context and ``ngrams``, which must
            hold a confidence grid) instead of the context-lookup and n-gram beams.
        node_costs: the confidence tree's cost of a forward of ``n`` tokens a row relative to one
            (``node_costs[n - 1]``), or such curves by the rows in the forward
            (:data:`redrafter.confidence.NodeCosts`); needed with ``lookup_nodes``.
        guess: the drafter's first step (:class:`redrafter.guess.DrafterGuess`), whose most probable token
            joins each row's confidence tree at its root, at the drafter's probability; needs
            ``lookup_nodes``. None: the tree holds the lookups' guesses alone.
        lean: run the target through :class:`redrafter.lean_decoder.LeanDecoder` where it covers
            the model (False: always transformers' decoder).
        policy: chooses per step of :meth:`decode` between a tree, a smaller tree
            (``small_tree``) and a plain one-token step from measured tokens per second
            (:class:`~redrafter.step_policy.SpeculationPolicy`, with :attr:`kinds`), so that where
            a tree forward costs more than it gains (a CPU without fast wide products, a prompt the
            drafter cannot follow) decoding is not slower than plain; None: a tree every step. It
            keeps what it measured from one call to the next.
        small_tree: a second, smaller tree the policy may choose (its proposer's beams, and the
            lookup beams cut shorter: at most ``lookup_len`` and ``ngram_len``), or None.
        argmax_head: a cheaper head for the greedy argmax's candidates
            (:class:`redrafter.quant.ArgmaxHead`), or None: the target's own.
        compile: run the lean forward through ``torch.compile``
            (:class:`redrafter.lean_decoder.CompiledDecoder`; needs ``lean`` and a covered model).
        packed: the lean forward's float products, and the head's, on weights reordered once for
            oneDNN (:class:`redrafter.lean_decoder.PackedForward`); None: where it applies (a
            bfloat16 or float16 target on a CPU with native products, or float32 copies of its
            weights where oneDNN converts bfloat16 as it goes), not with ``compile``.
    """

    def __init__(
        self,
        target: PreTrainedModel,
        proposer: Proposer,
        eos_token_ids: list[int],
        lookup_len: int = 0,
        ngrams: NgramTable | None = None,
        ngram_len: int = 0,
        lean: bool = True,
        policy: SpeculationPolicy | None = None,
        small_tree: TreeKind | None = None,
        argmax_head: nn.Module | None = None,
        compile: bool = False,
        packed: bool | None = None,
        lookup_nodes: int = 0,
        node_costs: NodeCosts = (),
        guess: DrafterGuess | None = None,
    ) -> None:
        if lookup_nodes and ((refusal := grid_refusal(ngrams)) is not None or not node_costs):
            raise ValueError(f"lookup_nodes needs an n-gram table with a confidence grid, and node costs ({refusal})")
        if guess is not None and not lookup_nodes:
            raise ValueError("the drafter's guess joins a confidence tree: it needs lookup_nodes")
        self.target = target
        self.argmax_head = argmax_head
        self.decoder = decoder_of(target)
        self.forward = target_forward(target, lean, compile, packed)
        # A packed forward's packed head, else our kernel's for a bfloat16 head on a CPU, else None.
        packed_head = forward_head(self.forward)
        self.head = packed_head if packed_head is not None else cpu_head(target)
        self.proposer = proposer
        self.layers: tuple[int, ...] = tuple(getattr(proposer, "target_layers", ()))
        self.hidden_size = target.config.hidden_size
        self.lookup_len = lookup_len
        self.ngrams, self.ngram_len = (ngrams, ngram_len) if ngrams is not None and ngram_len > 1 else (None, 0)
        self.confident = ngrams if lookup_nodes else None  # the confidence tree's table
        self.lookup_nodes, self.node_costs = lookup_nodes, node_costs
        self.guess = guess
        self.trees = [TreeKind(proposer)] + ([small_tree] if small_tree else [])
        self.kinds = STEP_KINDS[: len(self.trees) + 1]
        if policy is not None and len(policy.kinds) > len(self.kinds):
            raise ValueError(f"the policy chooses among {policy.kinds}; this decoder takes {self.kinds}")
        self.policy = policy
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_positions = context_limit(target.config)
        self.windows = attention_windows(target.config)
        self.clock: StageClock | None = None
        self.small_tree_nested = self.nested_small_tree()

    def nested_small_tree(self) -> bool:
        """Whether the small tree (kind 2) holds only tokens the tree (kind 1) holds too, at depth 1,
        so that a tree step also tells what the small tree would have emitted: it drafts one token
        (the drafter's most probable first token, which a most-probable-first tree, a dynamic one or
        a single beam, puts at ``beams[:, 0, 1]``) and the first token of each lookup beam (the
        tree's lookup beams begin with the same tokens). The step policy then learns the small tree's
        acceptance from the tree's steps too, where it would otherwise learn it only by exploring."""
        if len(self.trees) < 2:
            return False
        tree, small = self.trees
        if not (isinstance(tree.proposer, DrafterProposer) and isinstance(small.proposer, DrafterProposer)):
            return False
        big, little = tree.proposer, small.proposer
        most_probable_first = big.tree_nodes > 0 or big.num_beams == 1
        cut = all(length is not None and length <= 2 for length in (small.lookup_len, small.ngram_len))
        return (
            big.drafter is little.drafter
            and most_probable_first
            and big.draft_len >= 2
            and (little.num_beams, little.draft_len, little.tree_nodes) == (1, 2, 0)
            and cut
        )

    def _small_tree_counts(
        self, beams: torch.Tensor, tokens: torch.Tensor, lookup: LookupBeams | ConfidenceTree | None
    ) -> torch.Tensor:
        """``[B]`` tokens each row would have emitted in a small-tree step instead of this tree step
        (see :meth:`nested_small_tree`): two when the target's choice at the root (``tokens[:, 0]``
        of the step's ``[B, w]`` emitted tokens) is one of the small tree's depth-1 tokens, else one.

        ``beams`` ``[B, W + E, M]``: the drafter's ``W`` beams, then the ``E`` lookup beams."""
        small, columns = self.trees[1], [0]
        if lookup is not None:
            lookup_column, ngram_column = lookup.columns(beams.shape[1] - lookup.extra_beams)
            columns += [lookup_column] if lookup_column is not None and small.lookup_len == 2 else []
            columns += [ngram_column] if ngram_column is not None and small.ngram_len == 2 else []
        depth_one = beams[:, columns, 1]  # [B, c]
        return 1 + (depth_one == tokens[:, :1]).any(dim=1).long()

    def _stage(self, name: str) -> AbstractContextManager:
        return nullcontext() if self.clock is None else self.clock.stage(name, self.target.device)

    def _forward(
        self,
        cache: TreeKVCache,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        allowed: torch.Tensor,
        context_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Target forward of ``input_ids [B, q]`` at ``positions [B, q]``; returns ``[B, q, F]``
        features: the final hidden states ``[..., :d]``, then the proposer's target layers.

        ``allowed [B, q, K]``: which of the ``K`` keys (cached, then new) each query sees, at
        ``context_valid [B, C]``: which cached keys are real tokens. A real token's position is the
        count of real tokens before it, so the keys' positions (which sliding-window layers need,
        :func:`layer_masks`) are derived here, only for a model that has such layers.
        """
        key_positions = None
        if self.windows.window is not None:
            key_positions = torch.cat([context_valid.long().cumsum(dim=1) - 1, positions], dim=1)
        mask = layer_masks(allowed, positions, key_positions, self.windows, self.target.dtype)
        return self.forward(input_ids, positions, mask, cache, self.layers)

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[TreeKVCache, torch.Tensor, torch.Tensor]:
        """Run the left-padded prompts; return the cache, the last features ``[B, F]`` and
        which cached entries are real tokens ``[B, P]`` (padding is masked out of every attention)."""
        device = self.target.device
        batch, longest = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
        valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt, device=device)
            valid[row, longest - len(prompt) :] = True
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        allowed = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :]
        allowed |= torch.eye(longest, dtype=torch.bool, device=device)  # padding sees itself
        cache = TreeKVCache(self.target.config.num_hidden_layers, capacity=longest + max_new_tokens + 64)
        no_context = valid[:, :0]
        hidden = self._forward(cache, input_ids, positions, allowed, no_context)[:, -1]
        return cache, hidden, valid

    @torch.inference_mode()
    def decode(
        self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams | None = None
    ) -> Iterator[StepOutput]:
        """Decode ``prompts`` (token id lists) together; yield what each target forward emits.

        ``sampling``: greedy when None (or temperature 0), else exact sampling with its settings.
        The first yield comes from the prompt's prefill (one token per row). Every yield is one
        target forward pass. Rows are numbered by their index in ``prompts``.
        """
        if max_new_tokens <= 0:
            return
        sampling = sampling or SamplingParams()
        batch = RunningBatch(self, TokenChooser(self.target, sampling, self.argmax_head, self.head))
        yield batch.add(prompts, [max_new_tokens] * len(prompts))
        policy = self.policy
        try:
            while batch.size:
                kind = 1 if policy is None else policy.choose(batch.ids, sampling.greedy)
                start = time.perf_counter()
                out = batch.step(kind)
                if policy is not None:
                    seconds = time.perf_counter() - start
                    policy.record(out.rows, kind, [len(t) for t in out.tokens], seconds, out.nested)
                    for row, done in zip(out.rows, out.finished, strict=True):
                        if done:
                            policy.forget(row)
                yield out
        finally:  # rows are numbered from 0 in every call: none may carry its acceptance into the next
            if policy is not None:
                for row in batch.ids:
                    policy.forget(row)

    @torch.inference_mode()
    def warm_up(self, max_rows: int = 3) -> None:
        """Run each shape of forward a running batch of up to ``max_rows`` rows meets once: a prefill
        of one row and a step of each kind (:attr:`kinds`) at one row, then (``max_rows`` above 1) a
        prefill of two rows joining it and a step of each kind at three. With ``compile``, these are
        the graphs there are (dynamo compiles a size of 1 apart from larger ones, so one row and
        several rows, one-token steps and wider ones, each have their own), but for a forward whose
        products pad their rows to buckets (autotuned int4,
        :class:`~redrafter.lean_decoder.CompiledDecoder`), which has a step graph per bucket:
        :meth:`_warm_up_buckets` runs those. A server warmed up this way compiles nothing while it
        serves."""
        batch = RunningBatch(self, TokenChooser(self.target, SamplingParams(), self.argmax_head, self.head))
        vocab = self.target.config.vocab_size
        for rows in (1, 2) if max_rows > 1 else (1,):
            batch.add(_warm_up_prompts(vocab, rows, unequal=True), [64] * rows)
            for kind in range(len(self.kinds)):
                batch.step(kind)
        buckets = getattr(self.forward, "row_buckets", ())
        if buckets:
            self._warm_up_buckets(buckets, max_rows)

    def _warm_up_buckets(self, buckets: tuple[int, ...], max_rows: int) -> None:
        """A step's forward (after a prefill) for each graph of a forward that pads its products'
        rows to ``buckets``: per bucket, one row of that many tokens and, with ``max_rows`` above 1,
        that many rows of one token (up to ``max_rows``) and two rows of half as many; past the last
        bucket, the same with more tokens (and more rows than it, when ``max_rows`` allows). Dynamo
        keeps one graph for the sizes of a bucket, for one row and for more, for one token and for
        more."""
        beyond = buckets[-1] + 1
        shapes = {(1, 1), (1, beyond)} | {(1, b) for b in buckets if b > 1}
        if max_rows > 1:
            shapes |= {(2, b // 2) for b in buckets if b >= 4} | {(2, beyond // 2 + 1)}
            shapes |= {(b, 1) for b in buckets if 1 < b <= max_rows} | ({(beyond, 1)} if max_rows >= beyond else set())
        vocab, device = self.target.config.vocab_size, self.target.device
        for rows, tokens in sorted(shapes):
            cache, _, valid = self._prefill(_warm_up_prompts(vocab, rows), tokens)
            chain = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None].expand(rows, -1, -1)
            positions = valid.sum(dim=1, keepdim=True) + torch.arange(tokens, device=device)
            input_ids = torch.full((rows, tokens), vocab // 2, device=device)
            self._forward(cache, input_ids, positions, tree_allowed(chain, valid), valid)

    def _lookup(self, prompts: list[list[int]]) -> LookupBeams | ConfidenceTree | None:
        """The rows' confidence trees, or else their context-lookup and n-gram beams, or None when off."""
        if self.confident is not None:
            return ConfidenceTree(prompts, self.confident, self.node_costs, self.lookup_nodes, self.max_positions)
        if self.lookup_len <= 1 and self.ngrams is None:
            return None
        return LookupBeams(
            prompts, self.lookup_len, None, self.max_positions, ngrams=self.ngrams, ngram_length=self.ngram_len
        )

    def _lookup_beams(
        self,
        lookup: LookupBeams | ConfidenceTree,
        beams: torch.Tensor,
        hidden: torch.Tensor,
        last_token: torch.Tensor,
        kind: TreeKind,
    ) -> torch.Tensor:
        """The proposer's ``beams`` ``[B, W, L]`` with each row's lookup beams added, ``[B, W + E, M]``
        (``M >= L``; shorter beams end in PAD): a confidence tree's with the drafter's guess at its root
        where the decoder has one (from ``hidden [B, F]`` and ``last_token [B]``), for the rows whose
        lookups are not already sure (:attr:`redrafter.guess.DrafterGuess.below`)."""
        guesses = None
        if self.guess is not None and isinstance(lookup, ConfidenceTree):
            with self._stage("draft: drafter's guess"):
                rows = [row for row in range(len(last_token)) if lookup.root_confidence(row) < self.guess.below]
                if rows:
                    guesses = [None] * len(last_token)
                    if len(rows) < len(last_token):
                        chosen = torch.tensor(rows, device=last_token.device)
                        hidden, last_token = hidden[chosen], last_token[chosen]
                    tokens, probabilities = self.guess(hidden, last_token)
                    for row, token, probability in zip(rows, tokens.tolist(), probabilities.tolist(), strict=True):
                        guesses[row] = (token, probability)
        with self._stage("draft: lookup"):
            if guesses is not None:
                return lookup.beams(beams, kind.lookup_len, kind.ngram_len, guesses)
            return lookup.beams(beams, kind.lookup_len, kind.ngram_len)

    @torch.inference_mode()
    def replay(self, prompt: list[int], output: list[int]) -> list[int]:
        """Teacher-forced acceptance: what each target forward would emit if greedy decoding of
        ``prompt`` produced ``output`` (say, plain greedy decoding's output).

        The draft of every step comes from the target's hidden states along ``prompt + output``
        (one plain forward), the lookup beams from the same history, and a drafted token is accepted
        while it equals ``output``: the steps :meth:`decode` takes when its output is ``output``
        (token for token in float64). In low precision, where a tree forward's rounding can turn a
        near-tie and send the output elsewhere, this is the acceptance on one fixed text, so it
        compares drafters and tree shapes without that noise.

        Args:
            prompt: the prompt's token ids.
            output: the generated token ids (EOS included when reached).
        Returns:
            tokens emitted per target forward, the prefill's one token first; they sum to ``len(output)``.
        """
        if not output:
            return []
        device = self.target.device
        sequence = torch.tensor([prompt + output], device=device)  # [1, P + A]
        hidden = decoder_features(self.decoder, self.layers, input_ids=sequence, use_cache=False)[0]  # [P + A, F]
        truth = torch.tensor(output + [UNKNOWN], device=device)  # the target's choice after each output token
        lookup = self._lookup([prompt])
        counts, done = [1], 1  # the prefill emits output[0]
        while done < len(output):
            if lookup is not None:
                lookup.extend(0, output[done - counts[-1] : done])
            position = len(prompt) + done - 1  # of output[done - 1], the tree's root
            at = torch.tensor([position], device=device)
            beams = self.proposer(hidden[position - 1][None], sequence[:, position], at)
            if lookup is not None:
                beams = self._lookup_beams(
                    lookup, beams, hidden[position - 1][None], sequence[:, position], self.trees[0]
                )
            tree = build_tree(beams)
            # After a node at depth k on the output's own path the target chooses output[done + k];
            # only such nodes are ever consulted.
            choice = truth[(done + tree.depth).clamp(max=len(output))]  # [1, N]
            emitted = min(int(verify(beams, tree.node_index, choice).num_tokens[0]), len(output) - done)
            counts.append(emitted)
            done += emitted
        return counts

    def _tree_depth(self) -> int:
        return max(getattr(self.proposer, "draft_len", 1), self.lookup_len, self.ngram_len, self.lookup_nodes + 1)


@dataclass
class _Rows:
    """The device state of the rows decoding together, in batch order (``B`` rows, ``C`` cached entries).

    Attributes:
        ids: each row's id (given by :meth:`RunningBatch.add`).
        cache: their keys and values ``[B, H, C, D]`` per layer.
        hidden: ``[B, F]`` target features at each row's last accepted position.
        last_token: ``[B]`` the token the target produced there (the next tree's root).
        row_length: ``[B]`` real tokens cached per row (the root's position).
        context_valid: ``[B, C]`` which cached entries are the row's real tokens.
        step_tokens: ``[B, w]`` what the last forward emitted per row (the first ``step_counts``).
        step_counts: ``[B]``.
        lookup: the rows' lookup beams (host side), or None.
    """

    ids: list[int]
    cache: TreeKVCache
    hidden: torch.Tensor
    last_token: torch.Tensor
    row_length: torch.Tensor
    context_valid: torch.Tensor
    step_tokens: torch.Tensor
    step_counts: torch.Tensor
    lookup: LookupBeams | ConfidenceTree | None

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at indices ``keep``, in that order."""
        index = torch.tensor(keep, dtype=torch.long, device=self.hidden.device)
        self.cache.select_rows(index)
        if self.lookup is not None:
            self.lookup.select(keep)
        self.ids = [self.ids[i] for i in keep]
        for name in _ROW_TENSORS:
            setattr(self, name, getattr(self, name)[index])

    def compact(self, longest: int) -> None:
        """Drop the cached entries no row needs, if they are many: ``longest`` is the most real
        entries any row holds (host side). Each row's real entries move, in order, to the end of
        ``[0, longest)`` (left-padded, as a joining row is), so every later forward attends to
        ``longest`` entries instead of the shared length, which in a continuous batch only grows
        (joins are padded to it, tree steps extend it by the most any row accepted) until the
        batch empties. Moving entries changes nothing a row sees: positions, masks and window
        positions come from ``context_valid``. A copy of the needed entries; done once the
        padding is a quarter of the cache (:data:`COMPACT_SHARE`), so it pays back in a few steps."""
        length = self.cache.length
        if length - longest < max(COMPACT_MIN, COMPACT_SHARE * length):
            return
        # Stable: per row the padding first, then its real entries, each in order; the last `longest`.
        order = torch.sort(self.context_valid.to(torch.uint8), dim=1, stable=True).indices[:, length - longest :]
        self.cache.gather(order)
        self.context_valid = self.context_valid.gather(1, order)

    def merge(self, other: _Rows) -> None:
        """Append ``other``'s rows. The shorter context is left-padded (with entries masked out)
        so that both share one cache length: nothing a row sees changes."""
        length = max(self.cache.length, other.cache.length)
        self.cache.merge(other.cache)
        valid = [F.pad(v, (length - v.shape[1], 0)) for v in (self.context_valid, other.context_valid)]
        self.context_valid = torch.cat(valid)
        width = max(self.step_tokens.shape[1], other.step_tokens.shape[1])
        self.step_tokens = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in (self.step_tokens, other.step_tokens)])
        for name in ("hidden", "last_token", "row_length", "step_counts"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        if self.lookup is not None and other.lookup is not None:
            self.lookup.merge(other.lookup)
        self.ids = self.ids + other.ids


# On a CPU, the rows (tokens, padding included) that one more prefill forward is worth: splitting
# prompts that join together into groups of similar length saves their padding, at the price of
# reading the weights once more per group (prefill_groups). On the Ice Lake Xeon (2 threads) a
# forward of the default model costs about 31 ms for one token and a prefill about 1 ms per row.
PREFILL_FORWARD_ROWS = 64


def prefill_groups(lengths: list[int], device: torch.device | str = "cpu") -> list[list[int]]:
    """The prompts of ``lengths`` that join together, as groups (indices) each prefilled in one forward,
    left-padded to its longest. On a CPU: consecutive runs of the prompts sorted by length, chosen to
    make the fewest rows computed, counting :data:`PREFILL_FORWARD_ROWS` for each forward (exact, by
    dynamic programming over the sorted lengths). A group of 16 MT-Bench prompts (mean 100 tokens, up to
    402) is 52% padding in one forward. Elsewhere one group: a GPU's forward costs its launches more
    than its rows."""
    if torch.device(device).type != "cpu" or len(lengths) < 2:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # best[j]: the fewest rows for the shortest j prompts, and where their last group starts.
    best: list[tuple[float, int]] = [(0.0, 0)]
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        costs = ((best[start][0] + PREFILL_FORWARD_ROWS + (end - start) * longest, start) for start in range(end))
        best.append(min(costs))
    groups, end = [], len(order)
    while end:
        start = best[end][1]
        groups.append(order[start:end])
        end = start
    return groups[::-1]


# Compact a running batch's cache once this share of it (and at least this many entries) is padding.
COMPACT_SHARE, COMPACT_MIN = 0.25, 16

_ROW_TENSORS = (
    "hidden",
    "last_token",
    "row_length",
    "context_valid",
    "step_tokens",
    "step_counts",
)


class RunningBatch:
    """Rows decoding together, joining and leaving between target forwards (continuous batching).

    :meth:`add` prefills new rows (forwards over them alone, grouped by length) and merges them into
    the running cache; :meth:`step` runs one speculative step (draft, one tree forward, verify, keep)
    for every running row. Both return what each row emitted, and finished rows (EOS, token budget,
    context end) leave the batch at once. A row's output does not depend on which rows it ran beside.

    Args:
        decoder: the :class:`SpeculativeDecoder` (target, proposer, lookup settings).
        choose: the target's choice per tree node, ``(hidden [B, N, d], row ids, real slots per
            row [B] or None, positions [B, N] of the tokens chosen) -> [B, N]``:
            :class:`~redrafter.sampling.TokenChooser` (one setting for all) or
            :class:`~redrafter.sampling.RowChooser` (each row its own).
    """

    def __init__(self, decoder: SpeculativeDecoder, choose) -> None:
        self.decoder, self.choose = decoder, choose
        self.rows: _Rows | None = None
        self.budget: dict[int, int] = {}  # row id -> max new tokens
        self.emitted: dict[int, int] = {}
        self.next_id = 0

    @property
    def size(self) -> int:
        """Rows running."""
        return 0 if self.rows is None else len(self.rows.ids)

    @property
    def ids(self) -> list[int]:
        """The running rows' ids, in batch order."""
        return [] if self.rows is None else list(self.rows.ids)

    @torch.inference_mode()
    def add(self, prompts: list[list[int]], max_new_tokens: list[int]) -> StepOutput:
        """Prefill ``prompts`` (forwards over them alone: one per group of similar lengths,
        :func:`prefill_groups`) and let them join the batch, in their order.

        Returns the prefill's emission: one token per new row, named by the ids given to them
        (consecutive, from 0 for the first rows of this batch).
        """
        ids = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        self.budget.update(zip(ids, max_new_tokens, strict=True))
        self.emitted.update(dict.fromkeys(ids, 0))
        new: _Rows | None = None
        for group in prefill_groups([len(p) for p in prompts], self.decoder.target.device):
            budget = max(max_new_tokens[i] for i in group)
            rows = self._prefilled([ids[i] for i in group], [prompts[i] for i in group], budget)
            if new is None:
                new = rows
            else:
                new.merge(rows)
        order = [new.ids.index(row) for row in ids]
        if order != sorted(order):  # the rows in the order of ``prompts``
            new.select(order)
        out = self._emit(new)
        if new.ids:
            if self.rows is None:
                self.rows = new
            else:
                self.rows.merge(new)
        return out

    def _prefilled(self, ids: list[int], prompts: list[list[int]], max_new_tokens: int) -> _Rows:
        """Rows ``ids`` of ``prompts`` after one prefill forward over them (left-padded), each with its
        first token chosen."""
        d = self.decoder
        cache, hidden, valid = d._prefill(prompts, max_new_tokens)
        chosen_at = valid.sum(dim=1, keepdim=True)  # [B, 1]: the first new token's position
        first = self.choose(hidden[:, None, : d.hidden_size], ids, None, chosen_at)[:, 0]  # [B]
        return _Rows(
            ids=ids,
            cache=cache,
            hidden=hidden,
            last_token=first,
            row_length=valid.sum(dim=1),
            context_valid=valid,
            step_tokens=first[:, None],
            step_counts=torch.ones_like(first),
            lookup=d._lookup(prompts),
        )

    @torch.inference_mode()
    def step(self, kind: int = 1) -> StepOutput:
        """One target forward for every running row; returns what each emitted.

        ``kind``: 1 (or True) the decoder's tree, 2 its small tree (``decoder.trees[kind - 1]``);
        0 (or False) a plain one-token step (no draft, no lookup beams), cheaper per forward when
        verifying a tree costs more than it gains (a large batch, a CPU slow at wide products).
        """
        d, rows = self.decoder, self.rows
        if rows is None:
            return StepOutput(rows=[], tokens=[], finished=[])
        device = d.target.device
        if d.clock is not None:
            d.clock.steps += 1
        # 1-2. Draft and pack the tree.
        tree_kind = d.trees[kind - 1] if kind else None
        with d._stage("draft: beam search"):
            proposer = no_draft if tree_kind is None else tree_kind.proposer
            beams = proposer(rows.hidden, rows.last_token, rows.row_length)  # [B, W, L]
        if rows.lookup is not None and tree_kind is not None:
            beams = d._lookup_beams(rows.lookup, beams, rows.hidden, rows.last_token, tree_kind)
        with d._stage("tree: pack, mask"):
            tree = build_tree(beams)
            allowed = tree_allowed(tree.ancestors, rows.context_valid)  # [B, N, C + N]
            tree_positions = rows.row_length[:, None] + tree.depth  # [B, N]
        # 3. Verify the whole tree in one forward.
        start = rows.cache.length
        with d._stage("target: forward"):
            tree_hidden = d._forward(rows.cache, tree.tokens, tree_positions, allowed, rows.context_valid)
        with d._stage("target: head, argmax"):
            tree_hidden_final = tree_hidden[..., : d.hidden_size]
            target_choice = self.choose(tree_hidden_final, rows.ids, tree.num_nodes, tree_positions + 1)  # [B, N]
        # 4. Accept.
        with d._stage("verify"):
            verdict = verify(beams, tree.node_index, target_choice)
        # 5. Keep the accepted path's cache entries; mask each row's surplus.
        with d._stage("cache: keep path"):
            kept = int(verdict.num_tokens.max())
            rows.cache.keep(start, verdict.path[:, :kept])
            steps = torch.arange(kept, device=device)[None, :]
            rows.context_valid = torch.cat([rows.context_valid, steps < verdict.num_tokens[:, None]], dim=1)
            last_slot = verdict.path.gather(1, (verdict.num_tokens - 1)[:, None])  # [B, 1]
            rows.hidden = tree_hidden.gather(1, last_slot[:, :, None].expand(-1, -1, tree_hidden.shape[-1]))[:, 0]
            rows.row_length = rows.row_length + verdict.num_tokens
            rows.step_tokens, rows.step_counts = verdict.tokens, verdict.num_tokens
            rows.last_token = rows.step_tokens.gather(1, (rows.step_counts - 1)[:, None])[:, 0]
        nested = d._small_tree_counts(beams, verdict.tokens, rows.lookup) if kind == 1 and d.small_tree_nested else None
        out = self._emit(rows, nested)
        if not rows.ids:
            self.rows = None
        return out

    def cancel(self, row_id: int) -> None:
        """Drop a running row now (its client went away)."""
        if self.rows is not None and row_id in self.rows.ids:
            self.rows.select([i for i, r in enumerate(self.rows.ids) if r != row_id])
            if not self.rows.ids:
                self.rows = None
        self.budget.pop(row_id, None)
        self.emitted.pop(row_id, None)

    def _emit(self, rows: _Rows, small_tree_counts: torch.Tensor | None = None) -> StepOutput:
        """Host side: what each row of ``rows`` emits and whether it stops; finished rows leave ``rows``.
        ``small_tree_counts`` ``[B]``: what each would have emitted in a small-tree step (kind 2), or
        None; the output's ``nested`` holds them, cut as the tokens are (EOS, budget).

        One device-to-host copy: ``[tokens..., count, cached length(, small-tree count)]`` per row.
        """
        d = self.decoder
        with d._stage("host: emit, stop"):
            columns = [rows.step_tokens, rows.step_counts[:, None], rows.row_length[:, None]]
            if small_tree_counts is not None:
                columns.append(small_tree_counts[:, None])
            host = torch.cat(columns, dim=1).tolist()
            width = rows.step_tokens.shape[1]
            out_tokens, finished = [], []
            for i, row in enumerate(rows.ids):
                count, length = host[i][width], host[i][width + 1]
                tokens = host[i][:count]
                eos_at = next((k for k, t in enumerate(tokens) if t in d.eos_token_ids), None)
                if eos_at is not None:
                    tokens = tokens[: eos_at + 1]
                tokens = tokens[: self.budget[row] - self.emitted[row]]
                self.emitted[row] += len(tokens)
                done = (
                    eos_at is not None
                    or self.emitted[row] >= self.budget[row]
                    or length + count + d._tree_depth() >= d.max_positions
                )
                out_tokens.append(tokens)
                finished.append(done)
                if rows.lookup is not None and not done:
                    rows.lookup.extend(i, tokens)
        out = StepOutput(rows=list(rows.ids), tokens=out_tokens, finished=finished)
        if small_tree_counts is not None:
            out.nested[2] = [min(h[width + 2], len(tokens)) for h, tokens in zip(host, out_tokens, strict=True)]
        for row, done in zip(rows.ids, finished, strict=True):
            if done:
                del self.budget[row], self.emitted[row]
        keep = [i for i, done in enumerate(finished) if not done]
        if len(keep) < len(rows.ids):
            rows.select(keep)
        if keep:
            with d._stage("cache: compact"):
                rows.compact(max(host[i][width + 1] for i in keep))
        return out
