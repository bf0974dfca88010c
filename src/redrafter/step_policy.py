"""When to speculate: per step, a tree (draft and verify) or a plain one-token step (the server's
choice, and by default that of ``generate`` and ``bench``: :class:`~redrafter.decode.SpeculativeDecoder`).

Verifying a tree makes every row's share of the target's forward bigger. With few rows the forward
is cheap next to what the tree gains; with many, the target is busy anyway and plain steps give
more tokens per second. Where the two cross depends on the machine, the weights' precision, the
tree and the prompts, so :class:`SpeculationPolicy` measures it while serving. A step over rows
``r_1..r_b`` gives ``(a_1 + ... + a_b) / t_tree(b)`` tokens per second as a tree step and
``b / t_plain(b)`` as a plain one, with

- ``a_i``: tokens row ``r_i`` emits per tree step (a row's acceptance does not depend on the rows
  beside it, but on its prompt: see the end);
- ``t_tree(b)``, ``t_plain(b)``: seconds per step of each kind at ``b`` rows, the median of its
  recent steps (steady: a few steps suffice; a median, because one step slowed by something else
  on the machine would otherwise hold a mean up until exploration refreshed it).

It takes the faster kind. The other kind is still taken now and then, so its time (and, for
trees, the rows' acceptance) stays measured: once the time spent at that batch size since it was
last taken reaches what makes one more of its steps ``explore_share`` of the time (a quarter of
that while one kind is more than ``margin`` ahead: exploring a clear loser costs throughput).
Counting time, not steps, matters: at four rows a tree step takes about five plain ones, so
exploring one step in 16 would spend a quarter of the time on the slower kind. Until both kinds
are measured at a batch size, the ``prior`` decides (speculate while at most that many rows run),
and the other kind gets ``warmup_share`` of the time; trees are not tried at all above a batch
size where they lost. A fixed threshold (``adaptive=False``) never measures: the override for a
user who has measured it himself.

Acceptance is estimated per row: ``a_i`` is the mean of the row's own recent tree steps, shrunk
toward the mean of all rows' recent tree steps by ``prior_steps`` steps of it. A newly joined row
starts at that mean, and a row that drafts badly (a hard prompt) turns a lone row to plain steps
within a few steps instead of after the many a shared mean needs.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
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


@dataclass
class SpeculationPolicy:
    """Chooses per step whether to speculate, from the running rows and what was measured.

    Attributes:
        prior: speculate while at most this many rows run, until both kinds of step are measured
            at a batch size (and always, when not ``adaptive``).
        adaptive: measure and choose; False: the fixed threshold ``prior``.
        explore_share: the least share of the recent time at a batch size spent on the kind not
            chosen (a quarter of it while one kind is more than ``margin`` faster).
        margin: how much faster (a share) one kind must be for exploring the other less.
        time_window: steps of one kind at one batch size whose median is its step time.
        accept_window: tree steps (of all rows) whose mean tokens per row is the prior of a row.
        row_window: a row's own recent tree steps its estimate averages.
        prior_steps: how many steps of the prior a row's estimate adds to its own.
        warmup_steps: tree steps measured before acceptance is estimated at all (a few steps'
            mean is noise: one unlucky first step would read as a clear loser).
        warmup_share: the share of the time the kind not guessed gets until both are measured.
    """

    prior: int = 2
    adaptive: bool = True
    explore_share: float = 1 / 16
    margin: float = 0.4
    time_window: int = 8
    accept_window: int = 64
    row_window: int = 64
    prior_steps: int = 8
    warmup_steps: int = 8
    warmup_share: float = 1 / 4
    accepted: Window = field(init=False)
    seconds: dict[tuple[int, bool], Window] = field(default_factory=dict)  # (batch size, speculate) -> times
    waited: dict[tuple[int, bool], float] = field(default_factory=dict)  # (batch size, kind) -> seconds since taken
    rows_accepted: dict[int, Window] = field(default_factory=dict)  # row id -> its tokens per tree step

    def __post_init__(self) -> None:
        self.accepted = Window(self.accept_window)

    def row_estimate(self, row: int) -> float | None:
        """Tokens ``row`` is expected to emit in a tree step (None until ``warmup_steps`` tree steps)."""
        prior = self.accepted.mean
        if prior is None or self.accepted.count < self.warmup_steps:
            return None
        own = self.rows_accepted.get(row)
        if own is None or not own.values:
            return prior
        return (sum(own.values) + self.prior_steps * prior) / (len(own.values) + self.prior_steps)

    def rates(self, rows: Sequence[int]) -> tuple[float | None, float | None]:
        """Estimated tokens per second of a tree step and of a plain step over ``rows``."""
        size = len(rows)
        tree, plain = (self.seconds.get((size, kind)) for kind in (True, False))
        estimates = [self.row_estimate(row) for row in rows]
        tree_rate = None
        if tree is not None and None not in estimates:
            tree_rate = sum(estimates) / max(tree.median, 1e-9)  # type: ignore[arg-type]
        return tree_rate, None if plain is None else size / max(plain.median, 1e-9)

    def choose(self, rows: Sequence[int]) -> bool:
        """Whether the next step, over the running ``rows`` (their ids), drafts and verifies trees."""
        size = len(rows)
        guess = size <= self.prior
        if not self.adaptive:
            return guess
        if (size, True) not in self.seconds and self._trees_lost_below(size):
            return False
        tree, plain = self.rates(rows)
        if tree is None or plain is None:  # still measuring: the guess, and the other kind often
            best, share = guess, self.warmup_share
        else:
            far = max(tree, plain) > (1 + self.margin) * min(tree, plain)
            best, share = tree > plain, self.explore_share / (4 if far else 1)
        other = self.seconds.get((size, not best))
        waited = self.waited.get((size, not best))  # None: not a step at this size yet
        if waited is None:
            return best
        explore = other is None or waited >= other.median * (1 - share) / share
        return not best if explore else best

    def _trees_lost_below(self, size: int) -> bool:
        """Whether plain steps were faster at the largest smaller batch size where both kinds were
        measured. A tree step's cost grows with the rows while a plain step's barely does, so trees
        are not tried at a batch size above one where they lost: one tree step over 16 rows takes
        as long as 8 plain ones, and trying it at every batch size a server passes through cost
        a fifth of the throughput at 16 streams."""
        below = [b for b in range(1, size) if (b, True) in self.seconds and (b, False) in self.seconds]
        if not below:
            return False
        tree, plain = self._mean_rates(below[-1])
        return tree is not None and plain is not None and tree < plain

    def _mean_rates(self, size: int) -> tuple[float | None, float | None]:
        """Tokens per second of each kind of step at ``size`` rows, at the mean acceptance of recent
        tree steps (None where not measured)."""
        rates: list[float | None] = []
        for kind, per_row in ((True, self.accepted.mean), (False, 1.0)):
            times = self.seconds.get((size, kind))
            rates.append(None if times is None or per_row is None else size * per_row / max(times.median, 1e-9))
        return rates[0], rates[1]

    def record(self, rows: Sequence[int], speculate: bool, tokens: Sequence[int], seconds: float) -> None:
        """A step over ``rows`` (their ids) emitted ``tokens`` (one count per row) in ``seconds``."""
        if not self.adaptive:
            return
        size = len(rows)
        self.seconds.setdefault((size, speculate), Window(self.time_window)).add(seconds)
        self.waited[size, speculate] = 0.0
        self.waited[size, not speculate] = self.waited.get((size, not speculate), 0.0) + seconds
        if speculate:
            self.accepted.add(sum(tokens) / size)
            for row, count in zip(rows, tokens, strict=True):
                self.rows_accepted.setdefault(row, Window(self.row_window)).add(count)

    def forget(self, row: int) -> None:
        """``row`` finished or was cancelled."""
        self.rows_accepted.pop(row, None)

    def table(self) -> dict[str, dict[str, float | int | None]]:
        """What was measured: per batch size, each kind's tokens per second (at the mean acceptance
        of recent rows) and steps."""
        out: dict[str, dict[str, float | int | None]] = {}
        for size in sorted({size for size, _ in self.seconds}):
            entry = out.setdefault(str(size), {})
            for kind, rate in zip(("tree", "plain"), self._mean_rates(size), strict=True):
                times = self.seconds.get((size, kind == "tree"))
                entry[f"{kind}_tokens_per_second"] = None if rate is None else round(rate, 1)
                entry[f"{kind}_steps"] = 0 if times is None else times.count
        return out
