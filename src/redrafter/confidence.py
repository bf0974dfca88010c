"""A confidence tree: the lookup drafts verified as a tree of their most probable continuations.

The context lookup and the corpus n-gram table (:mod:`redrafter.lookup`, :mod:`redrafter.ngrams`)
each guess the next token, and how often a guess is right depends on what backs it. On the default
model's held-out corpus conversations a context match of one token alone was right 9% of the time and
one of six tokens or more 91%; the table's follower alone from 5% (a short n-gram with many
continuations) to 76% (a 6-gram that nearly always had it); a token both propose, up to 88%. Fixed
beams verify the same number of tokens whatever backs them (docs/confidence/ of the repository).

Here each step grows a tree best-first instead. A candidate token's probability is read from a grid
(:func:`fit_confidence`, fitted on held-out conversations of the corpus, stored with the n-gram
table) by two cells: the longest context match that proposes it (0 for none, else its length up to
:data:`CONTEXT_ORDERS`) and the table's proposal (0 for none, else the n-gram's order and the
follower's share of its continuations). A node's probability is the product along its path, the
expected number of its tokens accepted. The tree keeps the most probable nodes, as many as make the
expected tokens of the step per its cost largest (``node_costs``: a forward of ``n`` tokens relative
to one). Verification is the tree's as for any beams, so output is unchanged.

Rows that decode together share one forward, every row's tree padded to the largest, and a forward's
cost grows with its rows: on this project's 2-core CPU a step with a second token a row costs 1.3 plain
steps over two rows, 1.6 over four and 1.9 over sixteen (``docs/batch-tree/``). So ``node_costs`` may give a
curve per batch size (:func:`curve_at`), and a step keeps the same number of nodes in every row, the
number that makes the expected tokens of all rows per the step's cost largest: often none over many
rows (then the step is a plain one), a few where most rows copy.

Host-side state per row: the token history and, per ``n`` up to :data:`CONTEXT_ORDERS`, a dict from
each ``n``-gram to the position right after its latest occurrence (as :class:`~redrafter.lookup.LookupBeams`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import RedrafterError
from .lookup import index_tokens, with_extra_beams
from .ngrams import NgramTable

CONTEXT_ORDERS = 6
"""Longest context match looked for (a longer one counts as this long)."""
CONTEXT_SIZES = range(1, CONTEXT_ORDERS + 1)
SHARE_BUCKETS = 5
ORDER_BUCKETS = 3
GRID_SHAPE = (CONTEXT_ORDERS + 1, 1 + SHARE_BUCKETS * ORDER_BUCKETS)
"""The confidence grid: context cells by table cells."""
MIN_PROBABILITY = 0.03
"""Nodes less probable than this are not grown (they never pay for their forward here)."""
PRIOR, PRIOR_WEIGHT = 0.1, 2.0
"""What a cell seen ``n`` times with ``r`` right estimates: ``(r + w est) / (n + w)``, ``est`` the
coarser cell's estimate (the prior for the coarsest)."""


def table_cell(order: int, share: int) -> int:
    """The grid column of a table proposal: an ``order``-gram's follower with ``share`` (0..255)."""
    order_bucket = 0 if order <= 3 else 1 if order <= 5 else 2
    return 1 + min(SHARE_BUCKETS - 1, share * SHARE_BUCKETS // 256) + SHARE_BUCKETS * order_bucket


def grid_refusal(table: NgramTable | None) -> str | None:
    """Why ``table`` cannot drive a confidence tree, or None when it can."""
    if table is None:
        return "the drafter has no n-gram table"
    if table.confidence is None or table.shares is None:
        return "the drafter's n-gram table has no confidence grid: rebuild it with redrafter ngrams"
    if tuple(table.confidence.shape) != GRID_SHAPE:
        return f"the n-gram table's confidence grid is {tuple(table.confidence.shape)}, not {GRID_SHAPE}"
    return None


def candidates(
    history: list[int], index: dict[tuple[int, ...], int], table: NgramTable, path: Sequence[int] = ()
) -> dict[int, tuple[int, int]]:
    """``{token: (context cell, table cell)}``: the guesses for the token after ``history + path``.

    The context proposes the follower of the latest earlier occurrence of each suffix (longest
    first, each token once, at its longest match), the table its follower of the longest known suffix.
    """
    width = max(CONTEXT_ORDERS, table.max_n)
    tail = (history[-width:] + list(path))[-width:]
    found: dict[int, list[int]] = {}
    for n in range(min(CONTEXT_ORDERS, len(tail)), 0, -1):
        at = index.get(tuple(tail[len(tail) - n :]))
        if at is not None and history[at] not in found:
            found[history[at]] = [n, 0]
    proposal = table.longest(tail)
    if proposal is not None:
        order, token, share = proposal
        found.setdefault(token, [0, 0])[1] = table_cell(order, share)
    return {token: (cells[0], cells[1]) for token, cells in found.items()}


def _levels(cell: tuple[int, int]) -> list[tuple[int, int]]:
    """The cell and its coarser ones, finest first: the table's column, any table proposal, none."""
    context, table = cell
    return [(context, table), (context, -1 if table else 0), (context, -2)]


def fit_confidence(table: NgramTable, pairs: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
    """The confidence grid ``[GRID_SHAPE]`` float32: how often each cell's guess was the next token
    over every answer position of ``pairs`` (prompt ids, answer ids: conversations the table was
    not counted from), each cell shrunk towards its coarser ones (``PRIOR``, ``PRIOR_WEIGHT``)."""
    if table.shares is None:
        raise RedrafterError("the n-gram table keeps no shares: rebuild it with redrafter ngrams")
    seen: dict[tuple[int, int], list[int]] = {}
    for prompt, answer in pairs:
        history: list[int] = []
        index: dict[tuple[int, ...], int] = {}
        index_tokens(history, index, list(prompt) + list(answer[:1]), CONTEXT_SIZES)
        for token in answer[1:]:
            for guess, cell in candidates(history, index, table).items():
                for level in _levels(cell):
                    counts = seen.setdefault(level, [0, 0])
                    counts[0] += 1
                    counts[1] += guess == token
            index_tokens(history, index, [token], CONTEXT_SIZES)
    grid = np.zeros(GRID_SHAPE, dtype=np.float32)
    for context in range(GRID_SHAPE[0]):
        for column in range(GRID_SHAPE[1]):
            estimate = PRIOR
            for level in reversed(_levels((context, column))):
                total, right = seen.get(level, (0, 0))
                estimate = (right + PRIOR_WEIGHT * estimate) / (total + PRIOR_WEIGHT)
            grid[context, column] = estimate
    return grid


NodeCosts = Sequence[float] | Mapping[int, Sequence[float]]
"""A cost curve (``curve[n - 1]``: a forward of ``n`` tokens a row relative to one token a row), or such
curves by the number of rows in the forward."""


def curve_at(node_costs: NodeCosts, rows: int) -> list[float]:
    """The cost curve for a forward over ``rows`` rows: ``node_costs`` itself when it is one curve, else
    the curve of that batch size, interpolated linearly between the nearest given ones (the smallest's
    below them, the largest's above)."""
    if not isinstance(node_costs, Mapping):
        return list(node_costs)
    sizes = sorted(node_costs)
    below = [size for size in sizes if size <= rows]
    above = [size for size in sizes if size >= rows]
    if not below or not above:
        return list(node_costs[sizes[0] if not below else sizes[-1]])
    low, high = below[-1], above[0]
    if low == high:
        return list(node_costs[low])
    share = (rows - low) / (high - low)
    length = max(len(node_costs[low]), len(node_costs[high]))
    return [
        cost(node_costs[low], n) + share * (cost(node_costs[high], n) - cost(node_costs[low], n))
        for n in range(1, length + 1)
    ]


def cost(node_costs: Sequence[float], n: int) -> float:
    """The relative cost of a forward of ``n`` tokens: ``node_costs[n - 1]``, extended beyond by its
    last step."""
    if n <= len(node_costs):
        return node_costs[n - 1]
    slope = node_costs[-1] - node_costs[-2] if len(node_costs) > 1 else node_costs[-1]
    return node_costs[-1] + slope * (n - len(node_costs))


def best_count(probabilities: Sequence[float], node_costs: Sequence[float], rows: int = 1) -> int:
    """How many of the nodes (most probable first) to verify: the ``k`` maximizing the expected
    tokens per cost, ``(rows + sum of the first k probabilities) / cost(k + 1)`` (:func:`cost`).
    Over several rows, ``probabilities[j]`` sums the rows' ``j``-th nodes."""
    best, best_rate, expected = 0, rows / cost(node_costs, 1), float(rows)
    for k, probability in enumerate(probabilities, start=1):
        expected += probability
        rate = expected / cost(node_costs, k + 1)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


class ConfidenceTree:
    """Each row's confidence tree over its context and a corpus n-gram table; drop-in for
    :class:`~redrafter.lookup.LookupBeams` in the decode loop (``extend``, ``select``, ``merge``,
    ``beams``).

    Args:
        prompts: the rows' prompt token ids (the history starts with them).
        table: an n-gram table with shares and a fitted confidence grid.
        node_costs: ``node_costs[n - 1]``: a forward of ``n`` tokens a row relative to one
            (``[1.0, ...]``), or such curves by the number of rows in the forward (:func:`curve_at`).
        max_nodes: the most nodes a tree holds besides its root.
        max_positions: the target's context; a node never reaches past it.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        table: NgramTable,
        node_costs: NodeCosts,
        max_nodes: int,
        max_positions: int | None = None,
    ) -> None:
        if (refusal := grid_refusal(table)) is not None:
            raise RedrafterError(refusal)
        if max_nodes < 1 or not node_costs:
            raise ValueError("a confidence tree needs max_nodes >= 1 and node costs")
        self.table, self.grid = table, table.confidence.tolist()
        self.node_costs, self.max_nodes, self.max_positions = node_costs, max_nodes, max_positions
        self.histories: list[list[int]] = [[] for _ in prompts]
        self.indexes: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
        # Each row's guesses at its root until its history grows (asked for twice a step with a drafter's guess).
        self.roots: list[dict[int, float] | None] = [None for _ in prompts]
        self.extra_beams = 0  # beams the last call of beams() added per row
        for row, prompt in enumerate(prompts):
            self.extend(row, prompt)

    def extend(self, row: int, tokens: list[int]) -> None:
        """Append ``tokens`` (what ``row`` emitted) to its history."""
        index_tokens(self.histories[row], self.indexes[row], tokens, CONTEXT_SIZES)
        self.roots[row] = None

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        self.histories = [self.histories[i] for i in rows]
        self.indexes = [self.indexes[i] for i in rows]
        self.roots = [self.roots[i] for i in rows]

    def merge(self, other: ConfidenceTree) -> None:
        """Append ``other``'s rows (same settings) after these."""
        self.histories += other.histories
        self.indexes += other.indexes
        self.roots += other.roots

    def columns(self, width: int) -> tuple[None, None]:
        """No beam of a fixed kind sits at a fixed column (see :meth:`LookupBeams.columns`)."""
        return None, None

    def guesses(
        self, row: int, path: tuple[int, ...] = (), drafted: tuple[int, float] | None = None
    ) -> list[tuple[int, float]]:
        """``(token, probability)`` of each guess for the token after ``row``'s history and ``path``: the
        context's and the table's (:func:`candidates`), each at its grid cell's probability of being right,
        and ``drafted``, the drafter's guess (token, probability) where given; a token guessed twice
        takes the larger probability."""
        grid = self.grid
        found = None if path else self.roots[row]
        if found is None:
            looked_up = candidates(self.histories[row], self.indexes[row], self.table, path)
            found = {token: grid[context][column] for token, (context, column) in looked_up.items()}
            if not path:
                self.roots[row] = found
        if drafted is not None:
            found = dict(found)
            token, probability = drafted
            found[token] = max(found.get(token, 0.0), probability)
        return list(found.items())

    def root_confidence(self, row: int) -> float:
        """The probability of the likeliest of the context's and the table's guesses at ``row``'s root (0
        for none): where it is high, the drafter's guess rarely adds a token (:mod:`redrafter.guess`)."""
        return max((probability for _, probability in self.guesses(row)), default=0.0)

    def nodes(
        self, row: int, max_depth: int, costs: Sequence[float], drafted: tuple[int, float] | None = None
    ) -> list[tuple[tuple[int, ...], float]]:
        """The row's candidate nodes: ``(path, probability)`` of each node below the root, most probable
        first (so every node's parent comes before it), each the product of its guesses' probabilities
        along its path (:meth:`guesses`; ``drafted``: the drafter's guess among the root's), up to where
        one no longer pays under ``costs`` (a cost curve); :meth:`beams` keeps as many as
        :func:`best_count` says.

        Nodes are taken from a heap, most probable first, and only a taken node's children are
        looked up. Taking stops once a node would not pay for the next node's cost at the best rate
        so far (every later node is less probable, and the costs grow at least about as fast): over
        many rows, where a second token a row is dear, most rows stop at their first guess."""
        heap = [(-probability, i, (token,)) for i, (token, probability) in enumerate(self.guesses(row, (), drafted))]
        pushed = len(heap)
        heapq.heapify(heap)
        taken: list[tuple[tuple[int, ...], float]] = []
        expected, best_rate = 1.0, 1.0
        while heap and len(taken) < self.max_nodes:
            negative, _, path = heapq.heappop(heap)
            probability = -negative
            step = cost(costs, len(taken) + 2) - cost(costs, len(taken) + 1)
            if probability < MIN_PROBABILITY or probability < best_rate * step:
                break
            taken.append((path, probability))
            expected += probability
            best_rate = max(best_rate, expected / cost(costs, len(taken) + 1))
            if len(path) < max_depth:
                for token, factor in self.guesses(row, path):
                    heapq.heappush(heap, (negative * factor, pushed, (*path, token)))
                    pushed += 1
        return taken

    def beams(
        self,
        drafted: torch.Tensor,
        lookup_len: int | None = None,
        ngram_len: int | None = None,
        guesses: Sequence[tuple[int, float] | None] | None = None,
    ) -> torch.Tensor:
        """Add each row's tree, one beam per leaf, to ``drafted`` beams.

        Every row keeps its ``k`` most probable nodes (fewer where it has fewer), ``k`` from
        :func:`best_count` over all rows' nodes with the cost curve of this many rows
        (:func:`curve_at`): the rows' trees are padded to the largest in the forward.

        Args:
            drafted: ``[B, W, L]`` beams (token 0 of each row is the last token of its history).
            lookup_len, ngram_len: a smaller tree's cut: no node deeper than the larger of them minus
                one (None: only the context's end limits the depth).
            guesses: per row, the drafter's guess for the token after the root and its probability
                (:class:`redrafter.guess.DrafterGuess`), or None, which joins the root's guesses; None: none.
        Returns:
            ``[B, W + E, M]``, ``E`` the most leaves of any row (:attr:`extra_beams`), ``M`` the
            longest of ``L`` and the deepest leaf plus its root, shorter beams ending in ``PAD``; a
            row with fewer leaves repeats its beam 0.
        """
        batch, width, _ = drafted.shape
        costs = curve_at(self.node_costs, batch)
        cut = [length for length in (lookup_len, ngram_len) if length is not None]
        grown = []
        for row in range(batch):
            depth = self.max_nodes if not cut else max(cut) - 1
            if self.max_positions is not None:
                depth = min(depth, self.max_positions - len(self.histories[row]))
            guess = None if guesses is None else guesses[row]
            grown.append(self.nodes(row, depth, costs, guess) if depth > 0 else [])
        widest = max((len(nodes) for nodes in grown), default=0)
        sums = [sum(nodes[j][1] for nodes in grown if len(nodes) > j) for j in range(widest)]
        keep = best_count(sums, costs, batch)
        found: dict[tuple[int, int], list[int]] = {}
        self.extra_beams = 0
        for row, nodes in enumerate(grown):
            paths = [path for path, _ in nodes[:keep]]
            parents = {path[:-1] for path in paths}
            leaves = [[self.histories[row][-1], *path] for path in paths if path not in parents]
            found.update({(row, width + i): leaf for i, leaf in enumerate(leaves)})
            self.extra_beams = max(self.extra_beams, len(leaves))
        return with_extra_beams(drafted, self.extra_beams, found)
