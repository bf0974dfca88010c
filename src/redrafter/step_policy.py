"""When to speculate, and how much: per step, a tree, a small tree or a plain one-token step (the
server's choice, and by default that of ``generate`` and ``bench``:
:class:`~redrafter.decode.SpeculativeDecoder`).

Verifying a tree makes every row's share of the target's forward bigger. With few rows the forward
is cheap next to what the tree gains; with many, the target is busy anyway and plain steps give
more tokens per second. Where they cross depends on the machine, the weights' precision, the tree
and the prompts, and where a wide forward is dear (a CPU without bfloat16 instructions, int4
kernels) a small tree can beat both the full tree and plain steps. So :class:`SpeculationPolicy`
measures every kind of step it is offered while serving. A step of kind ``k`` over rows
``r_1..r_b`` gives ``(a_1 + ... + a_b) / t_k(b)`` tokens per second, with

- ``a_i``: tokens row ``r_i`` emits per step of that kind (1 for a plain step; a row's acceptance
  does not depend on the rows beside it, but on its prompt: see the end);
- ``t_k(b)``: seconds per step of kind ``k`` at ``b`` rows: a plain step's time (the median of its
  recent steps, or its latest step when faster: steady, a few steps suffice; a median, because one
  step slowed by something else on the machine would otherwise hold a mean up; the latest when
  faster, because a kind measured while the machine was busy would otherwise keep its slow median
  until several explorations had refreshed it), times what a step of kind ``k`` costs against a
  plain one. That cost is measured in pairs: each step that follows a step of another kind over the
  same rows gives the ratio of their times (the median of the recent ratios), and kinds never
  adjacent chain through a third. Two steps milliseconds apart ran on the same machine; a kind
  taken now and then and timed on its own is compared with the chosen kind's steps from minutes
  later, and this machine's speed moved by a third between two rounds of one run. At 64 streams the
  server's table put plain steps over 16 rows at 210 ms (timed while the machine was slow) and the
  small tree ahead of them, while its steps took 1.5 plain ones whenever they ran; it was taken on a
  quarter of the steps.

It takes the fastest kind, but a tree only when it is ahead of plain steps by ``lead``: a plain
step's rate is known (every row emits one token), a tree's is an estimate, and on a near-tie the
tree's error decides. At 16 rows a small tree took 1.5 plain steps' time for about 1.44 tokens a row
and was taken on two thirds of the steps. Where the two are close, plain steps lose nothing against
a plain server and a wrong tree does (and rows that emit unequal counts finish apart, so the last
rows of a wave run on at a few rows, in steps that cost nearly what 16 rows' do). Over one row there
is no lead (``lone_lead``): no rows finish apart, and a wrong tree corrects itself, since each tree
step measures the row, while a wrong plain step tells nothing and stays. With a lead of 10% there, a
bench on Spec-Bench's first 2 prompts per category took 2.60 tokens per step (2.52 with staleness and
a 1024-step prior), against 2.82 for a tree every step; without it, 2.75 (docs/serve/, Session 25).
Where trees are cheap next to their bursts (w4a8 targets), one row takes the tree every step
(``lone_tree``): the measured choice lost 5 to 6% to it there (docs/fused-layer/).
The others are still taken now and then, so their time (and, for trees, the rows' acceptance) stays
measured: each once the time spent at that batch size since it was last taken reaches what makes one more of its
steps ``explore_share`` of the time (a quarter of that while the chosen kind is more than ``margin``
ahead: exploring a clear loser costs throughput). Counting time, not steps, matters: at four rows a
tree step takes about five plain ones, so exploring one step in 16 would spend a quarter of the time
on the slower kind. Until every kind is measured at a batch size, the ``prior`` decides (the tree
while at most that many rows run), and each other kind gets ``warmup_share`` of the time; a tree is
not tried at all above a batch size where it lost to plain steps. A fixed threshold
(``adaptive=False``) never measures: the override for a user who has measured it himself.

Acceptance is estimated per row and kind: ``a_i`` is the mean of the row's own recent steps of
that kind, shrunk by ``prior_steps`` steps toward what all rows' recent steps of it say (below). A
newly joined row starts there, and a row that drafts badly (a hard prompt) turns a lone row to plain
steps within a few steps instead of after the many a shared mean needs. A row's own steps grow
stale while it takes other kinds: each step it took since one told the kind's tokens adds
``stale_weight`` steps of the prior. Without that, a tree whose last steps over a row were poor
stopped being taken, so nothing refreshed the estimate that stopped it (only explorations, a step
in 16 or 64): the low estimates stayed and the high ones were corrected. A
row's acceptance moves from one stretch of its answer to the next, and its past stretches hardly
tell its next one: replayed on every position of 80 MT-Bench prompts and 60 of Spec-Bench's other
kinds (``docs/serve/stale_sim.py``), with a tree step costing twice a plain one, one row took plain
steps on about half of the steps and lost 8% and 9% against a tree every step, though a tree every
step was faster than plain steps on 133 of the 140 prompts (and at least 0.90x on the rest); with
staleness and no lead at one row (below), 4.1% and 2.4%.

Where the tree holds the small tree's tokens (the decode loop says so:
:meth:`~redrafter.decode.SpeculativeDecoder.nested_small_tree`), every tree step also tells what the
small tree would have emitted: its acceptance stays current while the tree runs, without exploring
it (its step time is still measured by taking it). The reverse cannot be: a small-tree step does not
say what the tree would have emitted. So the tree's acceptance, a row's and all rows', is predicted
from the small tree's, along the line through the recent steps that told both
(:meth:`SpeculationPolicy.expected`: a row whose small tree emits two tokens is expected to emit, in
a tree step, what such rows emitted lately). Judged on its own steps instead, the tree's acceptance
went stale while the small tree ran: after a prompt the drafter could not follow, the easier prompts
after it stayed on the small tree, where the tree was only explored.

The tree shapes are ranked by all rows' recent steps (:meth:`SpeculationPolicy._shapes`), and the
first one ahead of plain steps by ``lead`` for these rows is taken. Taking the first in the ranking
over the rows' own estimates holds the choice steady (rows choosing their shape by their own
estimates were slower than either shape alone on Spec-Bench, docs/small-tree/); going on to the
second where the first is not ahead keeps a hard prompt on the small tree where it beats plain steps.
Replayed on every position of 80 MT-Bench prompts and 60 of Spec-Bench's other kinds
(``docs/serve/shape_sim.py``), the two changes gave 4.2% and 1.0% more tokens per second at one row
and 2.3% and 2.8% at four.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class Window:
    """The last ``window`` values added (their mean and median), and how many were added in all."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, value: float) -> None:
        self.values.append(value)
        self.count += 1

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def typical(self) -> float | None:
        """The median, or the latest value when smaller (a step time: see the module's docstring)."""
        return None if self.median is None else min(self.median, self.values[-1])


class PairWindow:
    """The last ``window`` pairs ``(x, y)`` added, and the least-squares line ``y = a + b x`` through
    them (running sums: a fit costs the same however many pairs it holds)."""

    def __init__(self, window: int) -> None:
        self.pairs: deque[tuple[float, float]] = deque()
        self.window = window
        self.sums = [0.0] * 4  # x, y, x * x, x * y

    def add(self, x: float, y: float) -> None:
        if len(self.pairs) == self.window:
            self._sum(*self.pairs.popleft(), sign=-1.0)
        self.pairs.append((x, y))
        self._sum(x, y, sign=1.0)

    def _sum(self, x: float, y: float, sign: float) -> None:
        for index, value in enumerate((x, y, x * x, x * y)):
            self.sums[index] += sign * value

    def predict(self, x: float) -> float | None:
        """``a + b x`` (None while the pairs' ``x`` are all equal or there are none)."""
        count = len(self.pairs)
        if not count:
            return None
        sum_x, sum_y, sum_xx, sum_xy = self.sums
        spread = sum_xx - sum_x * sum_x / count
        if spread <= 1e-9:
            return None
        slope = (sum_xy - sum_x * sum_y / count) / spread
        return (sum_y - slope * sum_x) / count + slope * x


@dataclass
class SpeculationPolicy:
    """Chooses per step which kind of step to take, from the running rows and what was measured.

    Kind 0 is a plain one-token step; kinds 1, 2, ... are tree steps of the shapes the decode loop
    offers, largest first (:attr:`kinds` names them: the loop's tree, and a small tree when it has
    one). A bool is a kind too (True: the tree, False: a plain step).

    Attributes:
        prior: speculate (kind 1) while at most this many rows run, until every kind is measured
            at a batch size (and always, when not ``adaptive``).
        adaptive: measure and choose; False: the fixed threshold ``prior``.
        kinds: the kinds' names, plain first (what :meth:`table` reports them as).
        explore_share: the least share of the recent time at a batch size spent on each kind not
            chosen (a quarter of it while the chosen one is more than ``margin`` faster).
        margin: how much faster (a share) one kind must be for exploring the other less.
        lead: how much faster (a share) a tree must be estimated than plain steps to be chosen
            over them, over several rows (see the module's docstring).
        lone_lead: the same over one row.
        time_window: steps of one kind at one batch size whose median is its step time.
        accept_window: steps of a tree kind (of all rows) whose mean tokens per row is a row's prior.
        row_window: a row's own recent steps of a tree kind its estimate averages.
        prior_steps: how many steps of the prior a row's estimate adds to its own.
        warmup_rows: rows' steps of a tree kind measured before its acceptance is estimated at all
            (a few rows' mean is noise: one unlucky first step of one row would read as a clear
            loser). Rows, not steps: one tree step over 16 rows costs as much as several plain
            ones, and until the acceptance is known every kind not guessed gets ``warmup_share``
            of the time, so counting steps spent a quarter of a fresh server's first minute at 16
            rows on tree steps.
        warmup_share: the share of the time each kind not guessed gets until all are measured.
        verdict_steps: steps of a tree kind at a batch size, faster than plain steps there, that
            outweigh its loss at a smaller size (:meth:`_ruled_out`). A loss below may rest on one
            step: a fresh server at 4 streams measured one small-tree step at 3 rows (its rows
            finishing) at a quarter of plain steps' rate, and then hardly took the small tree at 4
            rows, where it was the fastest kind.
        pair_window: rows' tree steps that told the smaller tree's tokens too, through which the line
            predicting the tree's acceptance from the smaller one's is drawn (:meth:`expected`).
        pair_warmup: such rows' steps before the line is drawn (until then the tree's own steps).
        stale_weight: steps of the prior a row's estimate of a tree kind gains for each step the row
            took since one told that kind's tokens (:meth:`row_estimate`).
        lone_tree: one running greedy row always takes the tree (kind 1), unmeasured; the choice
            applies from two rows, and to a sampled row (at temperature 1 on 8 MT-Bench prompts a tree
            every step gave 90.8 tokens/s against plain decoding's 98.7, docs/host-steps/). Where a
            tree step costs little next to what its bursts of accepted tokens bring (w4a8 targets:
            :data:`redrafter.api.DEFAULT_LONE_TREE`), the measured choice at one greedy row lost to a
            tree every step: a row's acceptance comes in bursts (copied spans) that its recent steps
            do not foretell, so the plain steps it took when a row's estimate dipped missed them (see
            the module's docstring).
    """

    prior: int = 2
    adaptive: bool = True
    kinds: tuple[str, ...] = ("plain", "tree")
    explore_share: float = 1 / 16
    margin: float = 0.4
    lead: float = 0.1
    lone_lead: float = 0.0
    time_window: int = 8
    accept_window: int = 64
    row_window: int = 64
    prior_steps: int = 8
    warmup_rows: int = 8
    warmup_share: float = 1 / 4
    verdict_steps: int = 3
    pair_window: int = 512
    pair_warmup: int = 32
    stale_weight: float = 0.5
    lone_tree: bool = False
    accepted: dict[int, Window] = field(default_factory=dict)  # tree kind -> tokens per row of its steps
    accepted_rows: dict[int, int] = field(default_factory=dict)  # tree kind -> rows' steps of it, in all
    seconds: dict[tuple[int, int], Window] = field(default_factory=dict)  # (batch size, kind) -> step times
    waited: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch size, kind) -> seconds since taken
    rows_accepted: dict[int, dict[int, Window]] = field(default_factory=dict)  # row -> tree kind -> its tokens
    # (batch size, kind, other kind) -> log of a step's seconds over those of the step just before it
    # (of the other kind, over the same rows)
    paired: dict[tuple[int, int, int], Window] = field(default_factory=dict)
    last_step: tuple[tuple[int, ...], int, float] | None = None  # its rows, kind and seconds
    # (tree kind, smaller kind it holds) -> per row of its steps: (the smaller kind's tokens, the tree's)
    nested_pairs: dict[tuple[int, int], PairWindow] = field(default_factory=dict)
    stale: dict[int, dict[int, int]] = field(default_factory=dict)  # row -> tree kind -> its steps since one told it

    def row_estimate(self, row: int, kind: int = 1) -> float | None:
        """Tokens ``row`` is expected to emit in a step of tree ``kind`` (None until ``warmup_rows``
        rows took such steps): its own recent steps of that kind and ``prior_steps`` steps of all rows'
        mean, plus ``stale_weight`` more of it for each step the row took since one told that kind's
        tokens (see the module's docstring)."""
        steps = self.accepted.get(kind)
        if steps is None or self.accepted_rows.get(kind, 0) < self.warmup_rows or steps.mean is None:
            return None
        prior = self.expected(kind, row)
        own = self.rows_accepted.get(row, {}).get(kind)
        if own is None or not own.values:
            return prior
        weight = self.prior_steps + self.stale_weight * self.stale.get(row, {}).get(kind, 0)
        return (sum(own.values) + weight * prior) / (len(own.values) + weight)  # type: ignore[operator]

    def expected(self, kind: int, row: int | None = None) -> float | None:
        """Tokens per row a step of tree ``kind`` is expected to emit (of ``row``'s, or all rows'):
        where ``kind`` holds a smaller tree, predicted from what the smaller one emits now (``row``'s
        estimate, or all rows' recent mean) along the line through ``pair_window`` recent steps
        that told both; else the mean of recent steps of ``kind`` (None: none yet)."""
        steps = self.accepted.get(kind)
        mean = None if steps is None else steps.mean
        for (tree, smaller), pairs in self.nested_pairs.items():
            if tree != kind or len(pairs.pairs) < self.pair_warmup:
                continue
            if row is None:
                told = self.accepted[smaller].mean if smaller in self.accepted else None
            else:
                told = self.row_estimate(row, smaller)
            predicted = None if told is None else pairs.predict(told)
            if predicted is not None:
                return max(1.0, predicted)
        return mean

    def rates(self, rows: Sequence[int]) -> list[float | None]:
        """Estimated tokens per second of a step of each kind over ``rows`` (None: not measured)."""
        size, rates = len(rows), []
        for kind in range(len(self.kinds)):
            seconds = self.step_seconds(size, kind)
            estimates = [1.0] * size if kind == 0 else [self.row_estimate(row, kind) for row in rows]
            if seconds is None or None in estimates:
                rates.append(None)
            else:
                rates.append(sum(estimates) / max(seconds, 1e-9))  # type: ignore[arg-type]
        return rates

    def step_seconds(self, size: int, kind: int) -> float | None:
        """``t_k(b)``: seconds a step of ``kind`` takes at ``size`` rows (None: not measured), as plain
        steps' time times its cost against them where pairs measured that, else its own recent steps'."""
        times, plain = self.seconds.get((size, kind)), self.seconds.get((size, 0))
        if times is None:
            return None
        cost = None if plain is None else self.relative_cost(size, kind)
        return times.typical if cost is None else plain.typical * cost  # type: ignore[operator]

    def relative_cost(self, size: int, kind: int) -> float | None:
        """A step of ``kind`` over a plain step's time at ``size`` rows, from steps taken one after the
        other (directly, or through a third kind); None where no such pairs were seen."""
        if kind == 0:
            return 1.0
        direct = self.paired.get((size, kind, 0))
        if direct is not None:
            return math.exp(direct.median)  # type: ignore[arg-type]
        for other in range(1, len(self.kinds)):
            first, second = self.paired.get((size, kind, other)), self.paired.get((size, other, 0))
            if other != kind and first is not None and second is not None:
                return math.exp(first.median + second.median)  # type: ignore[operator]
        return None

    def choose(self, rows: Sequence[int], greedy: bool = True) -> int:
        """The kind of the next step over the running ``rows`` (their ids): 0 plain, else a tree.
        ``greedy``: whether the rows decode greedily (``lone_tree`` holds for a greedy row only: a
        sampled one accepts fewer drafts and pays for every node's distribution, so the measured
        choice decides there)."""
        size = len(rows)
        guess = int(size <= self.prior)
        if not self.adaptive:
            return guess
        if self.lone_tree and size == 1 and greedy:
            return 1
        kinds = [k for k in range(len(self.kinds)) if not self._ruled_out(size, k)]
        rates = self.rates(rows)
        measured = all(rates[k] is not None for k in kinds)
        if measured:  # the first tree shape ahead of plain steps by the lead, else plain steps
            lead = self.lead if size > 1 else self.lone_lead
            ahead = [k for k in self._shapes(size, kinds) if rates[k] >= (1 + lead) * rates[0]]  # type: ignore[operator]
            best = ahead[0] if ahead else 0
        else:  # still measuring: the guess, and the other kinds often
            best = guess if guess in kinds else 0
        overdue: list[tuple[float, int]] = []  # (how overdue, kind) of the kinds due for exploring
        for kind in kinds:
            waited = self.waited.get((size, kind))
            if kind == best or waited is None:  # None: not a step at this size yet
                continue
            seconds = self.step_seconds(size, kind)
            if seconds is None:
                return kind
            share = self.warmup_share
            if measured:
                far = rates[best] > (1 + self.margin) * rates[kind]  # type: ignore[operator]
                share = self.explore_share / (4 if far else 1)
            due = waited / (seconds * (1 - share) / share)
            if due >= 1:
                overdue.append((due, kind))
        return max(overdue)[1] if overdue else best

    def _shapes(self, size: int, kinds: list[int]) -> list[int]:
        """The tree kinds among ``kinds`` (all measured), the one that gave most tokens per second over
        all rows lately first."""
        pooled = self._mean_rates(size)
        return sorted((kind for kind in kinds if kind), key=lambda kind: -(pooled[kind] or 0.0))

    def _ruled_out(self, size: int, kind: int) -> bool:
        """Whether tree ``kind`` is not worth a step at ``size`` rows: it lost below (:meth:`_lost_below`)
        and did not win here (:meth:`_won_here`), or, not measured at this size, its step time there
        (interpolated between the nearest sizes where it was measured, one below and one above) makes it
        slower than the plain steps measured here. A server that fills up at once and then empties as its
        rows finish meets the sizes between from above, where nothing below has lost yet; trying a tree at
        each of them cost a fresh server's first 16-stream round about 4 of its 20 seconds."""
        if kind == 0:
            return False
        if self._lost_below(size, kind):
            return not self._won_here(size, kind)
        if (size, kind) in self.seconds or (size, 0) not in self.seconds or kind not in self.accepted:
            return False
        measured = sorted(b for b, k in self.seconds if k == kind)
        below, above = [b for b in measured if b < size], [b for b in measured if b > size]
        if not below or not above:
            return False
        low, high = below[-1], above[0]
        low_time, high_time = self.step_seconds(low, kind), self.step_seconds(high, kind)
        seconds = low_time + (high_time - low_time) * (size - low) / (high - low)  # type: ignore[operator]
        plain_seconds = self.step_seconds(size, 0)
        return size * self.expected(kind) / seconds < size / plain_seconds  # type: ignore[operator]

    def _won_here(self, size: int, kind: int) -> bool:
        """Whether tree ``kind`` took at least ``verdict_steps`` steps at ``size`` rows and gave more
        tokens per second there than plain steps."""
        times = self.seconds.get((size, kind))
        return times is not None and times.count >= self.verdict_steps and self._beats_plain(size, kind) is True

    def _beats_plain(self, size: int, kind: int) -> bool | None:
        """Whether tree ``kind`` gives more tokens per second than plain steps at ``size`` rows, at the
        acceptance expected of all rows (:meth:`_mean_rates`); None where either is not measured."""
        rates = self._mean_rates(size)
        return None if rates[kind] is None or rates[0] is None else rates[kind] > rates[0]

    def _lost_below(self, size: int, kind: int) -> bool:
        """Whether tree ``kind`` was slower than plain steps at the largest smaller batch size where both
        were measured. A tree step's cost grows with the rows while a plain step's barely does, so a tree is
        not tried at a batch size above one where it lost: one tree step over 16 rows takes as long as 8
        plain ones, and trying it at every batch size a server passes through cost a fifth of the throughput
        at 16 streams. Nor is it explored there once it lost below, even where it was measured before (a
        server's first pass through the batch sizes measures the larger ones first as its rows finish),
        unless it won there (:meth:`_won_here`): the smaller size, still explored, keeps the verdict
        current, and the acceptance it is judged at is that of the latest tree steps."""
        if kind == 0:
            return False
        below = [b for b in range(1, size) if (b, kind) in self.seconds and (b, 0) in self.seconds]
        if not below:
            return False
        return self._beats_plain(below[-1], kind) is False

    def _mean_rates(self, size: int) -> list[float | None]:
        """Tokens per second of each kind of step at ``size`` rows, at all rows' expected acceptance
        (:meth:`expected`; None where not measured)."""
        rates: list[float | None] = []
        for kind in range(len(self.kinds)):
            seconds = self.step_seconds(size, kind)
            per_row = 1.0 if kind == 0 else self.expected(kind)
            rates.append(None if seconds is None or per_row is None else size * per_row / max(seconds, 1e-9))
        return rates

    def record(
        self,
        rows: Sequence[int],
        kind: int,
        tokens: Sequence[int],
        seconds: float,
        nested: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        """A step of ``kind`` over ``rows`` (their ids) emitted ``tokens`` (one count per row) in
        ``seconds``. ``nested``: per smaller tree kind that this step's tree holds, what each row
        would have emitted with it (its acceptance, measured on the same steps; not its time)."""
        if not self.adaptive:
            return
        size, kind = len(rows), int(kind)
        self.seconds.setdefault((size, kind), Window(self.time_window)).add(seconds)
        if self.last_step is not None:
            last_rows, before, before_seconds = self.last_step
            if last_rows == tuple(rows) and before != kind:
                ratio = math.log(max(seconds, 1e-9) / max(before_seconds, 1e-9))
                self.paired.setdefault((size, kind, before), Window(self.time_window)).add(ratio)
                self.paired.setdefault((size, before, kind), Window(self.time_window)).add(-ratio)
        self.last_step = (tuple(rows), kind, seconds)
        for other in range(len(self.kinds)):
            self.waited[size, other] = 0.0 if other == kind else self.waited.get((size, other), 0.0) + seconds
        if kind:
            self._accept(rows, kind, tokens)
        for row in rows:
            stale = self.stale.setdefault(row, {})
            for tree in range(1, len(self.kinds)):
                stale[tree] = 0 if tree == kind or tree in (nested or {}) else stale.get(tree, 0) + 1
        for other, counts in (nested or {}).items():
            self._accept(rows, other, counts)
            pairs = self.nested_pairs.setdefault((kind, other), PairWindow(self.pair_window))
            for told, emitted in zip(counts, tokens, strict=True):
                pairs.add(told, emitted)

    def _accept(self, rows: Sequence[int], kind: int, tokens: Sequence[int]) -> None:
        """Tree ``kind`` emitted (or would have) ``tokens`` over ``rows``."""
        self.accepted.setdefault(kind, Window(self.accept_window)).add(sum(tokens) / len(rows))
        self.accepted_rows[kind] = self.accepted_rows.get(kind, 0) + len(rows)
        for row, count in zip(rows, tokens, strict=True):
            self.rows_accepted.setdefault(row, {}).setdefault(kind, Window(self.row_window)).add(count)

    def forget(self, row: int) -> None:
        """``row`` finished or was cancelled."""
        self.rows_accepted.pop(row, None)
        self.stale.pop(row, None)

    def table(self) -> dict[str, dict[str, float | int | None]]:
        """What was measured: per batch size, each kind's tokens per second (at all rows' expected
        acceptance, :meth:`expected`) and steps."""
        out: dict[str, dict[str, float | int | None]] = {}
        for size in sorted({size for size, _ in self.seconds}):
            entry = out.setdefault(str(size), {})
            for kind, (name, rate) in enumerate(zip(self.kinds, self._mean_rates(size), strict=True)):
                times = self.seconds.get((size, kind))
                entry[f"{name}_tokens_per_second"] = None if rate is None else round(rate, 1)
                entry[f"{name}_steps"] = 0 if times is None else times.count
        return out
