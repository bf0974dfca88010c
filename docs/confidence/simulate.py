"""Replay the lookup drafts along fixed greedy outputs: the two lookup beams against the confidence tree,
both the engine's own classes over the shipped n-gram table, in tokens a step, tree nodes a step and
an estimated speed-up from the cost curve the tree is sized by.

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
from collections import defaultdict

import torch

from redrafter.api import DEFAULT_DRAFTER, NODE_COSTS
from redrafter.confidence import ConfidenceTree, cost
from redrafter.lookup import LookupBeams
from redrafter.ngrams import NgramTable
from redrafter.tree import PAD, build_tree


def replay(record: dict, lookup) -> tuple[int, float, int]:
    """Steps (the prefill's included), estimated cost in plain steps, and tree nodes of one prompt."""
    answer, done, steps, spent, nodes = record["answer"], 1, 1, 1.0, 0
    lookup.extend(0, answer[:1])
    while done < len(answer):
        beams = lookup.beams(torch.tensor([[[answer[done - 1]]]]))[0].tolist()
        truth, accepted = answer[done:], 0
        for beam in beams:
            k = 0
            while k + 1 < len(beam) and beam[k + 1] != PAD and k < len(truth) and beam[k + 1] == truth[k]:
                k += 1
            accepted = max(accepted, k)
        size = int(build_tree(torch.tensor([beams])).num_nodes[0])
        emitted = min(accepted + 1, len(truth))
        lookup.extend(0, answer[done : done + emitted])
        done, steps, spent, nodes = done + emitted, steps + 1, spent + cost(NODE_COSTS, size), nodes + size
    return steps, spent, nodes


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
                steps, spent, nodes = (sum(results[i][k] for i in indices) for k in range(3))
                tokens = sum(len(records[i]["answer"]) for i in indices)
                per_step, nodes = tokens / steps, nodes / (steps - len(indices))
                return f"{per_step:.3f} tokens a step, {nodes:.2f} nodes, {tokens / spent:.3f}x estimated"

            same = sum(result[0] == record["steps"] for result, record in zip(results, records, strict=True))
            print(f"{path}, {name}: {line(list(range(len(records))))}; steps as in the file: {same} of {len(records)}")
            for category, indices in categories.items():
                print(f"    {category:15s} {line(indices)}")


if __name__ == "__main__":
    main()
