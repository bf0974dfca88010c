"""Replay the lookup drafts along fixed greedy outputs: the two lookup beams against the confidence tree,
both the engine's own classes over the shipped n-gram table, in tokens a step, tree nodes a step and
an estimated speed-up from the cost curve the tree is sized by, and the host time a step takes to
build and pack the tree.

    python docs/confidence/dump.py ../shared/data/mt_bench.jsonl 0 mt80.jsonl        # greedy outputs
    python docs/confidence/dump.py ../shared/data/spec_bench.jsonl 20 spec180.jsonl
    python docs/confidence/simulate.py mt80.jsonl spec180.jsonl

With no drafted beams (the w4a8 default) a tree depends only on the history, so a replay along the
target's own greedy output takes the steps the engine takes: each prompt's step count is compared with
the one in the file (the engine that wrote it: the lookup beams before this change, the confidence tree
after). The estimate prices a step of n tokens at NODE_COSTS[n - 1] plain ones (the prefill at one).
"""

import json
import sys
import time
from collections import defaultdict

import torch

from redrafter.api import DEFAULT_DRAFTER, NODE_COSTS
from redrafter.confidence import ConfidenceTree, cost
from redrafter.decode import UNKNOWN
from redrafter.lookup import LookupBeams
from redrafter.ngrams import NgramTable
from redrafter.tree import build_tree
from redrafter.verify import verify


def replay(record: dict, lookup, costs=NODE_COSTS) -> tuple[int, float, int, float]:
    """Steps (the prefill's included), estimated cost in plain steps (a step of n tokens at
    ``cost(costs, n)``), tree nodes and host seconds (the beams built and packed) of one prompt;
    acceptance as SpeculativeDecoder.replay judges it."""
    answer, done, steps, spent, nodes, host = record["answer"], 1, 1, 1.0, 0, 0.0
    truth = torch.tensor([answer + [UNKNOWN]])  # the target's choice after each output token
    lookup.extend(0, answer[:1])
    while done < len(answer):
        start = time.perf_counter()
        beams = lookup.beams(torch.tensor([[[answer[done - 1]]]]))
        tree = build_tree(beams)
        host += time.perf_counter() - start
        choice = truth[:, (done + tree.depth[0]).clamp(max=len(answer))]
        emitted = min(int(verify(beams, tree.node_index, choice).num_tokens[0]), len(answer) - done)
        lookup.extend(0, answer[done : done + emitted])
        size = int(tree.num_nodes[0])
        done, steps, spent, nodes = done + emitted, steps + 1, spent + cost(costs, size), nodes + size
    return steps, spent, nodes, host


def main() -> None:
    table = NgramTable.load(DEFAULT_DRAFTER)
    arms = {
        "lookup beams": lambda prompt: LookupBeams([prompt], 3, None, 8192, ngrams=table, ngram_length=3),
        "confidence tree": lambda prompt: ConfidenceTree([prompt], table, NODE_COSTS, 12, 8192),
    }
    for path in sys.argv[1:]:
        records = [json.loads(line) for line in open(path)]
        categories = defaultdict(list)
        for i, record in enumerate(records):
            categories[record["category"]].append(i)
        for name, make in arms.items():
            results = [replay(record, make(record["prompt"])) for record in records]

            def line(indices: list[int], results: list = results, records: list = records) -> str:
                steps, spent, nodes, host = (sum(results[i][k] for i in indices) for k in range(4))
                tokens, trees = sum(len(records[i]["answer"]) for i in indices), steps - len(indices)
                per_step, nodes, host = tokens / steps, nodes / trees, 1e3 * host / trees
                estimate = tokens / spent
                return f"{per_step:.3f} tokens a step, {nodes:.2f} nodes, {estimate:.3f}x estimated, host {host:.3f} ms"

            same = sum(result[0] == record["steps"] for result, record in zip(results, records, strict=True))
            print(f"{path}, {name}: {line(list(range(len(records))))}; steps as in the file: {same} of {len(records)}")
            for category, indices in categories.items():
                print(f"    {category:15s} {line(indices)}")


if __name__ == "__main__":
    main()
