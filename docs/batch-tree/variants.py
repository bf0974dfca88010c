"""Variants of the confidence tree replayed along fixed greedy outputs (``docs/confidence/simulate.py``'s
replay: tokens a step, nodes a step, and the speed-up estimated by a cost curve), against the shipped
tree. Each variant is a tree built differently, none of it in the package:

- ``lambda=L``: keep the ``k`` nodes maximizing ``E - L * cost(k + 1)`` (a long-run rate ``L``,
  Dinkelbach's rule for a ratio of sums) instead of each step's ``E / cost(k + 1)``;
- ``calibrated=W``: each row scales the grid's probability of its guesses by its own verified nodes'
  hits over their predicted sum per (context cell, table proposal or not), shrunk by ``W``;
- ``orders=1,2,...``: context matches looked up at these orders, each its own grid row (a match at
  order ``n`` being at least ``n`` tokens), the grid refitted on the held-out conversations;
- ``table=FOLDER``: another drafter folder's n-gram table and grid;
- ``dearer``: the shipped tree, but each step priced by ``NODE_COSTS`` plus 0.1 from two tokens on
  (``truth=dearer`` prices every arm so; ``cut=dearer`` sizes the tree by it).

    python docs/confidence/dump.py ../shared/data/mt_bench.jsonl 0 mt80.jsonl 256    # greedy outputs
    python docs/batch-tree/variants.py mt80.jsonl shipped lambda=1.4 lambda=2.3 calibrated=2
    python docs/batch-tree/variants.py mt80.jsonl spec180.jsonl shipped orders=1,2,3,4,5,6,8,12
    python docs/batch-tree/variants.py mt80.jsonl truth=dearer shipped cut=dearer
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "confidence"))

from simulate import replay  # noqa: E402

import redrafter.confidence as confidence  # noqa: E402
from redrafter.api import DEFAULT_DRAFTER, NODE_COSTS  # noqa: E402
from redrafter.confidence import ConfidenceTree, cost  # noqa: E402
from redrafter.ngrams import NgramTable  # noqa: E402
from redrafter.train import load_corpora, split_heldout  # noqa: E402

DEARER = (1.0,) + tuple(c + 0.1 for c in NODE_COSTS[1:])
CORPUS = "data/corpus/smollm2-135m-instruct"
TABLE_FOLDERS = [CORPUS] + [
    f"{CORPUS}-{name}"
    for name in "seed1 seed2 seed3 seed4 gpu-seed5 gpu-seed6 gpu-seed7 gpu-seed8 seed9 openers-seed10 "
    "openers-seed11 openers-seed12".split()
]  # make ngrams' data: every 25th conversation held out for the grid


class CalibratedTree(ConfidenceTree):
    """Scales each guess's grid probability by the row's own record (see the module's docstring)."""

    weight = 2.0

    def __init__(self, *args, **kwargs) -> None:
        self.hits: dict[tuple[int, bool], float] = {}
        self.predicted: dict[tuple[int, bool], float] = {}
        self.looked_up: dict[tuple[int, ...], tuple[float, tuple[int, bool]]] = {}  # node -> its guess, cell
        self.last: list[tuple[tuple[int, ...], float, tuple[int, bool]]] = []
        super().__init__(*args, **kwargs)

    def guesses(self, row, path=(), drafted=None):
        found = []
        for token, (context, column) in confidence.candidates(
            self.histories[row], self.indexes[row], self.table, path
        ).items():
            key = (context, column > 0)
            scale = (self.hits.get(key, 0.0) + self.weight) / (self.predicted.get(key, 0.0) + self.weight)
            factor = min(0.99, self.grid[context][column] * scale)
            self.looked_up[(*path, token)] = (factor, key)
            found.append((token, factor))
        return found

    def nodes(self, row, max_depth, costs, drafted=None):
        self.looked_up = {}
        taken = super().nodes(row, max_depth, costs, drafted)
        self.last = [(path, *self.looked_up[path]) for path, _ in taken]
        return taken

    def extend(self, row, tokens):
        """After a step ``tokens`` are the target's from its root on: score each node whose parent held."""
        for path, factor, key in self.last:
            depth = len(path)
            if depth <= len(tokens) and list(path[:-1]) == tokens[: depth - 1]:
                self.predicted[key] = self.predicted.get(key, 0.0) + factor
                self.hits[key] = self.hits.get(key, 0.0) + (path[-1] == tokens[depth - 1])
        self.last = []
        super().extend(row, tokens)


def lambda_count(rate: float):
    def count(sums, costs, rows=1):
        best, best_value, expected = 0, rows - rate * rows * cost(costs, 1), float(rows)
        for k, probability in enumerate(sums, start=1):
            expected += probability
            if expected - rate * rows * cost(costs, k + 1) > best_value:
                best, best_value = k, expected - rate * rows * cost(costs, k + 1)
        return best

    return count


def order_candidates(sizes: list[int]):
    rows = {n: i + 1 for i, n in enumerate(sizes)}

    def candidates(history, index, table, path=()):
        tail = (history[-max(max(sizes), table.max_n) :] + list(path))[-max(max(sizes), table.max_n) :]
        found: dict[int, list[int]] = {}
        for n in reversed(sizes):
            at = index.get(tuple(tail[len(tail) - n :])) if n <= len(tail) else None
            if at is not None and history[at] not in found:
                found[history[at]] = [rows[n], 0]
        proposal = table.longest(tail)
        if proposal is not None:
            order, token, share = proposal
            found.setdefault(token, [0, 0])[1] = confidence.table_cell(order, share)
        return {token: (cells[0], cells[1]) for token, cells in found.items()}

    return candidates


@contextlib.contextmanager
def patched(**names):
    """The confidence module's ``names`` set for the block (the variants' rules), then restored."""
    saved = {name: getattr(confidence, name) for name in names}
    for name, value in names.items():
        setattr(confidence, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(confidence, name, value)


def arm(spec: str, shipped: NgramTable):
    """``(patches, make a tree for a prompt)`` of a variant."""
    name, _, value = spec.partition("=")
    if name == "shipped":
        return {}, lambda prompt: ConfidenceTree([prompt], shipped, NODE_COSTS, 12, 8192)
    if name == "cut":
        return {}, lambda prompt: ConfidenceTree([prompt], shipped, DEARER, 12, 8192)
    if name == "lambda":
        return {"best_count": lambda_count(float(value))}, lambda prompt: ConfidenceTree(
            [prompt], shipped, NODE_COSTS, 12, 8192
        )
    if name == "calibrated":
        CalibratedTree.weight = float(value)
        return {}, lambda prompt: CalibratedTree([prompt], shipped, NODE_COSTS, 12, 8192)
    if name == "table":
        table = NgramTable.load(value)
        return {}, lambda prompt: ConfidenceTree([prompt], table, NODE_COSTS, 12, 8192)
    if name == "orders":
        sizes = [int(n) for n in value.split(",")]
        patches = {
            "CONTEXT_ORDERS": max(sizes),
            "CONTEXT_SIZES": sizes,
            "GRID_SHAPE": (len(sizes) + 1, confidence.GRID_SHAPE[1]),
            "candidates": order_candidates(sizes),
        }
        table = NgramTable.load(DEFAULT_DRAFTER)
        pairs = load_corpora(TABLE_FOLDERS)
        heldout = [pairs[i] for i in split_heldout(len(pairs), 25)[1]]
        with patched(**patches):
            table.confidence = confidence.fit_confidence(table, heldout)
        return patches, lambda prompt: ConfidenceTree([prompt], table, NODE_COSTS, 12, 8192)
    raise SystemExit(f"unknown variant {spec!r}")


def main() -> None:
    files = [a for a in sys.argv[1:] if a.endswith(".jsonl")]
    specs = [a for a in sys.argv[1:] if not a.endswith(".jsonl") and not a.startswith("truth=")]
    truth = DEARER if "truth=dearer" in sys.argv[1:] else NODE_COSTS
    shipped = NgramTable.load(DEFAULT_DRAFTER)
    for spec in specs:
        patches, make = arm(spec, shipped)
        for path in files:
            records = [json.loads(line) for line in open(path)]
            with patched(**patches):
                results = [replay(record, make(record["prompt"]), truth) for record in records]
            steps, spent, nodes = (sum(result[k] for result in results) for k in range(3))
            tokens = sum(len(record["answer"]) for record in records)
            print(
                f"{Path(path).name}, {spec}: {tokens / steps:.3f} tokens a step, {nodes / steps:.2f} nodes, "
                f"{tokens / spent:.3f}x estimated",
                flush=True,
            )


if __name__ == "__main__":
    main()
