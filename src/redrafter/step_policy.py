"""When the server speculates: per step, a tree (draft and verify) or a plain one-token step.

Verifying a tree makes every row's share of the target's forward bigger. With few rows the forward
is cheap next to what the tree gains; with many, the target is busy anyway and plain steps give
more tokens per second. Where the two cross depends on the machine, the weights' precision, the
tree and the prompts, so :class:`SpeculationPolicy` measures it while serving. A step over ``b``
rows gives ``b a / t_tree(b)`` tokens per second as a tree step and ``b / t_plain(b)`` as a plain
one, with

- ``a``: tokens a row emits per tree step, averaged over the recent tree steps at any batch size
  (a row's acceptance does not depend on the rows beside it; it varies a lot from step to step, so
  it needs many steps, and tree steps at few rows supply them);
- ``t_tree(b)``, ``t_plain(b)``: seconds per step of each kind at ``b`` rows, the median of its
  recent steps (steady: a few steps suffice; a median, because one step slowed by something else
  on the machine would otherwise hold a mean up until exploration refreshed it).

It takes the faster kind. Every ``explore_every``-th step at a batch size takes the other kind, so
its time stays measured (a quarter as often while one kind is more than ``margin`` ahead: exploring
a clear loser costs throughput); until both are measured at a batch size, the ``prior`` decides
(speculate while at most that many rows run). A fixed threshold (``adaptive=False``) never
measures: the override for a user who has measured it himself.
"""

from __future__ import annotations

import statistics
from collections import deque
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
    """Chooses per step whether to speculate, from the batch size and what was measured.

    Attributes:
        prior: speculate while at most this many rows run, until both kinds of step are measured
            at a batch size (and always, when not ``adaptive``).
        adaptive: measure and choose; False: the fixed threshold ``prior``.
        explore_every: at a batch size, every this-many-th step takes the kind not chosen (a quarter
            as often while one kind is more than ``margin`` faster).
        margin: how much faster (a share) one kind must be for exploring the other less often.
        time_window: steps of one kind at one batch size whose median is its step time.
        accept_window: tree steps the tokens per row per tree step averages over.
    """

    prior: int = 2
    adaptive: bool = True
    explore_every: int = 16
    margin: float = 0.4
    time_window: int = 8
    accept_window: int = 64
    accepted: Window = field(init=False)
    seconds: dict[tuple[int, bool], Window] = field(default_factory=dict)  # (batch size, speculate) -> times
    steps: dict[int, int] = field(default_factory=dict)  # batch size -> steps chosen at it

    def __post_init__(self) -> None:
        self.accepted = Window(self.accept_window)

    def rates(self, batch_size: int) -> tuple[float | None, float | None]:
        """Estimated tokens per second of a tree step and of a plain step over ``batch_size`` rows."""
        tree, plain = (self.seconds.get((batch_size, kind)) for kind in (True, False))
        accepted = self.accepted.mean
        tree_rate = None if tree is None or accepted is None else batch_size * accepted / max(tree.median, 1e-9)
        return tree_rate, None if plain is None else batch_size / max(plain.median, 1e-9)

    def choose(self, batch_size: int) -> bool:
        """Whether the next step, over ``batch_size`` rows, drafts and verifies trees."""
        guess = batch_size <= self.prior
        if not self.adaptive:
            return guess
        count = self.steps.get(batch_size, 0)
        self.steps[batch_size] = count + 1
        tree, plain = self.rates(batch_size)
        if tree is None or plain is None:
            best, interval = guess, self.explore_every
        else:
            far = max(tree, plain) > (1 + self.margin) * min(tree, plain)
            best, interval = tree > plain, self.explore_every * (4 if far else 1)
        return not best if count % interval == interval - 1 else best

    def record(self, batch_size: int, speculate: bool, tokens: int, seconds: float) -> None:
        """A step over ``batch_size`` rows emitted ``tokens`` in all in ``seconds``."""
        if not self.adaptive:
            return
        self.seconds.setdefault((batch_size, speculate), Window(self.time_window)).add(seconds)
        if speculate:
            self.accepted.add(tokens / batch_size)

    def table(self) -> dict[str, dict[str, float | int | None]]:
        """What was measured: per batch size, each kind's estimated tokens per second and steps."""
        out: dict[str, dict[str, float | int | None]] = {}
        for size in sorted({size for size, _ in self.seconds}):
            entry = out.setdefault(str(size), {})
            for kind, rate in zip(("tree", "plain"), self.rates(size), strict=True):
                times = self.seconds.get((size, kind == "tree"))
                entry[f"{kind}_tokens_per_second"] = None if rate is None else round(rate, 1)
                entry[f"{kind}_steps"] = 0 if times is None else times.count
        return out
