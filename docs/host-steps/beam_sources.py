"""What each beam of a tree step brings, by source: the drafter's token, the context-lookup beam and the
n-gram beam, split by the length of the suffix their match rests on. A tree every step over 16 MT-Bench
prompts (every 5th), 128 new tokens, the tree the default engine had before Session 31 (one drafter
beam of one token, lookup and n-gram beams of 3 tokens).

    python docs/host-steps/beam_sources.py            # w4a8 weights (the default here)
    python docs/host-steps/beam_sources.py float      # the dequantized model in bfloat16

Columns: steps where the beam was in the tree (a lookup beam that matched nothing is a copy of the
drafter's and not counted), tokens it proposed, tokens of it the target accepted, and tokens accepted
beyond what the other beams of the step got ("alone"): what the step would lose without it.
"""

import collections
import json
import sys

import numpy as np

import redrafter.decode as decode
import redrafter.lookup as lookup
import redrafter.ngrams as ngrams
from redrafter.api import ReDrafter
from redrafter.ngrams import ngram_hash

weights = sys.argv[1] if len(sys.argv) > 1 else "auto"
rd = ReDrafter.from_pretrained(
    "default", weights=weights, adaptive=False, num_beams=1, draft_len=2, lookup_len=3, ngram_len=3, tree_nodes=0
)
matched: dict[str, int | None] = {}
continuation = lookup.LookupBeams.continuation


def matching_continuation(self, row, count):
    history, index = self.histories[row], self.indexes[row]
    matched["lookup"] = next((n for n in self.sizes if len(history) >= n and tuple(history[-n:]) in index), None)
    return continuation(self, row, count)


draft = ngrams.NgramTable.draft


def matching_draft(self, history, count):
    suffix = list(history[-self.max_n :])
    matched["ngram"] = None
    for n in range(min(self.max_n, len(suffix)), self.min_n - 1, -1):
        key = np.uint64(ngram_hash(suffix[len(suffix) - n :]))
        at = min(int(np.searchsorted(self.keys, key)), len(self.keys) - 1)
        if self.keys[at] == key:
            matched["ngram"] = n
            break
    return draft(self, history, count)


stats = collections.defaultdict(lambda: [0, 0, 0, 0])  # (source, n) -> steps, proposed, accepted, alone
verify = decode.verify


def counting_verify(beams, node_index, choice):
    row, slots, chosen = beams[0].tolist(), node_index[0].tolist(), choice[0].tolist()
    accepted = []
    for beam, beam_slots in zip(row, slots, strict=True):
        count = 0
        while count < len(beam) - 1 and beam[count + 1] == chosen[beam_slots[count]]:
            count += 1
        accepted.append(count)
    names = ["drafter"] * (len(row) - 2) + ["lookup", "ngram"]
    copies = {w for w, name in enumerate(names) if name != "drafter" and row[w] == row[0][: len(row[w])]}
    for w, name in enumerate(names):
        if w in copies:
            continue
        others = max([accepted[x] for x in range(len(row)) if x != w and x not in copies] + [0])
        entry = stats[name, matched.get(name) if name != "drafter" else 0]
        entry[0] += 1
        entry[1] += sum(1 for token in row[w][1:] if token != -1)
        entry[2] += accepted[w]
        entry[3] += max(0, accepted[w] - others)
    return verify(beams, node_index, choice)


lookup.LookupBeams.continuation = matching_continuation
ngrams.NgramTable.draft = matching_draft
decode.verify = counting_verify
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench.jsonl")][::5][:16]
for prompt in prompts:
    rd.generate(prompt, max_new_tokens=128)
print(f"weights {rd.quantization.weights}")
print("source    suffix  steps  proposed  accepted  alone  accepted/proposed  alone/step")
for (source, n), (steps, proposed, accepted, alone) in sorted(stats.items()):
    print(
        f"{source:8s}  {n:6d}  {steps:5d}  {proposed:8d}  {accepted:8d}  {alone:5d}"
        f"  {accepted / max(1, proposed):17.3f}  {alone / max(1, steps):10.3f}"
    )
