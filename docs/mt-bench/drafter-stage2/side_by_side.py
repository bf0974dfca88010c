"""Side by side on MT-Bench with the bench's own runners: `ar` and trees given as JSON.

The trees: {name: {num_beams, draft_len, tree_nodes}}. Run from the repository root:

    python docs/mt-bench/drafter-stage2/side_by_side.py ../shared/data/mt_bench.jsonl \\
      '{"W4L3": {"num_beams": 4, "draft_len": 3, "tree_nodes": 0},
        "W6L4T9": {"num_beams": 6, "draft_len": 4, "tree_nodes": 9}}'
"""

import json
import sys

import torch

from redrafter.api import ReDrafter
from redrafter.bench import ForwardCounter, _measure, make_methods, variant
from redrafter.prompts import read_prompts

torch.set_num_threads(2)
rd = ReDrafter.from_pretrained()
prompts = read_prompts(sys.argv[1])
counter = ForwardCounter(rd.decoder.decoder)
runners = {"ar": make_methods(rd, ["ar"], 256, None, counter)["ar"]}
for name, change in json.loads(sys.argv[2]).items():
    runners[name] = make_methods(variant(rd, **change), ["redrafter"], 256, None, counter)["redrafter"]
records = _measure(rd, prompts, list(runners), runners, False, False)
totals = {m: [0, 0.0, 0] for m in runners}  # tokens, seconds, target forwards
for record in records:
    for m, v in record["methods"].items():
        totals[m][0] += v["new_tokens"]
        totals[m][1] += v["seconds"]
        totals[m][2] += v["steps"]
ar_rate = totals["ar"][0] / totals["ar"][1]
for m, (tokens, seconds, steps) in totals.items():
    rate = tokens / seconds
    print(
        f"{m:14s} tok/s {rate:6.1f} speedup {rate / ar_rate:.3f} tokens/step {tokens / steps:.3f} "
        f"ms/step {1000 * seconds / steps:.1f}",
        flush=True,
    )
