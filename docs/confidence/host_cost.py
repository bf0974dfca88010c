"""Host time a step of the lookup drafts (building the beams and packing the tree), the confidence tree
against the two lookup beams, along greedy outputs of dump.py (the first 40 prompts):

    python docs/confidence/host_cost.py mt80.jsonl
"""

import json
import sys
import time

import torch

from redrafter.api import DEFAULT_DRAFTER, NODE_COSTS
from redrafter.confidence import ConfidenceTree
from redrafter.lookup import LookupBeams
from redrafter.ngrams import NgramTable
from redrafter.tree import PAD, build_tree

table = NgramTable.load(DEFAULT_DRAFTER)
records = [json.loads(line) for line in open(sys.argv[1])][:40]
arms = {
    "confidence tree": lambda prompt: ConfidenceTree([prompt], table, NODE_COSTS, 12, 8192),
    "lookup beams": lambda prompt: LookupBeams([prompt], 3, None, 8192, ngrams=table, ngram_length=3),
}
for name, make in arms.items():
    spent = steps = 0
    for record in records:
        lookup, answer, done = make(record["prompt"]), record["answer"], 1
        lookup.extend(0, answer[:1])
        while done < len(answer):
            start = time.perf_counter()
            beams = lookup.beams(torch.tensor([[[answer[done - 1]]]]))
            build_tree(beams)
            spent, steps = spent + time.perf_counter() - start, steps + 1
            accepted = 0
            for beam in beams[0].tolist():
                k = 0
                while (
                    k + 1 < len(beam)
                    and beam[k + 1] != PAD
                    and done + k < len(answer)
                    and beam[k + 1] == answer[done + k]
                ):
                    k += 1
                accepted = max(accepted, k)
            emitted = min(accepted + 1, len(answer) - done)
            lookup.extend(0, answer[done : done + emitted])
            done += emitted
    print(f"{name}: {1e3 * spent / steps:.3f} ms a step over {steps} steps")
