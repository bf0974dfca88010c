"""Pruning the weak lookup beams, tried and not kept: the context lookup only where it matches a suffix
of at least 2 tokens, the n-gram beam only on one of at least 4 (their weak matches bring little a node,
`beam_sources.txt`). The default, the pruned default and plain decoding interleaved per prompt (the
order reversed every other prompt), the first PER prompts of each category, 256 new tokens, greedy.

    python docs/host-steps/pruned_lookup.py ../shared/data/mt_bench.jsonl 3
"""

import json
import sys
import time

import numpy as np

import redrafter.lookup as lookup
import redrafter.ngrams as ngrams
from redrafter.api import ReDrafter
from redrafter.bench import plain_engine, variant
from redrafter.ngrams import ngram_hash

MIN_LOOKUP, MIN_NGRAM = 2, 4
pruning = {"on": False}
draft, continuation = ngrams.NgramTable.draft, lookup.LookupBeams.continuation


def longest_known_suffix(table, history) -> int:
    suffix = list(history[-table.max_n :])
    for n in range(min(table.max_n, len(suffix)), table.min_n - 1, -1):
        key = np.uint64(ngram_hash(suffix[len(suffix) - n :]))
        if table.keys[min(int(np.searchsorted(table.keys, key)), len(table.keys) - 1)] == key:
            return n
    return 0


def pruned_draft(self, history, count):
    if pruning["on"] and longest_known_suffix(self, history) < MIN_NGRAM:
        return []
    return draft(self, history, count)


def pruned_continuation(self, row, count):
    history, index = self.histories[row], self.indexes[row]
    matched = next((n for n in self.sizes if len(history) >= n and tuple(history[-n:]) in index), 0)
    if pruning["on"] and matched < MIN_LOOKUP:
        return None
    return continuation(self, row, count)


ngrams.NgramTable.draft, lookup.LookupBeams.continuation = pruned_draft, pruned_continuation
path, per = sys.argv[1], int(sys.argv[2])
rd = ReDrafter.from_pretrained("default")
engines = {"default": (rd, False), "pruned": (variant(rd), True), "ar": (plain_engine(rd), False)}
by_category: dict[str | None, list[str]] = {}
for line in open(path):
    row = json.loads(line)
    by_category.setdefault(row.get("category"), []).append(row["turns"][0])
prompts = [prompt for group in by_category.values() for prompt in group[:per]]
for engine, _ in engines.values():
    engine.generate(prompts[0], max_new_tokens=16)  # warm-up
totals = {name: [0, 0.0, 0] for name in engines}
for index, prompt in enumerate(prompts):
    ids = rd.encode(prompt)
    order = list(engines.items()) if index % 2 == 0 else list(reversed(engines.items()))
    for name, (engine, prune) in order:
        pruning["on"] = prune
        start = time.perf_counter()
        result = engine.generate_ids([ids], 256)[0]
        totals[name][1] += time.perf_counter() - start
        totals[name][0] += result.new_tokens
        totals[name][2] += result.steps
for name, (tokens, seconds, steps) in totals.items():
    print(f"{name:8s} {tokens / seconds:6.1f} tokens/s  {tokens / steps:.2f} tokens/step")
