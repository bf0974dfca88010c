"""Side by side on MT-Bench with the bench's own runners: ar and trees given as JSON {name: {num_beams, draft_len, tree_nodes}}.

Run (from the repository root): python docs/mt-bench/drafter-stage2/side_by_side.py ../shared/data/mt_bench.jsonl \
  '{"W4L3": {"num_beams": 4, "draft_len": 3, "tree_nodes": 0}, "W6L4T9": {"num_beams": 6, "draft_len": 4, "tree_nodes": 9}}'
"""

import json
import sys

import torch

torch.set_num_threads(2)
from redrafter.api import ReDrafter
from redrafter.bench import ForwardCounter, _measure, make_methods, variant
from redrafter.prompts import read_prompts

rd = ReDrafter.from_pretrained()
prompts = read_prompts(sys.argv[1])
configs = json.loads(sys.argv[2])
counter = ForwardCounter(rd.decoder.decoder)
runners = {"ar": make_methods(rd, ["ar"], 256, None, counter)["ar"]}
for name, ch in configs.items():
    runners[name] = make_methods(variant(rd, **ch), ["redrafter"], 256, None, counter)["redrafter"]
records = _measure(rd, prompts, list(runners), runners, False, False)
tot = {m: [0, 0.0, 0] for m in runners}
for r in records:
    for m, v in r["methods"].items():
        tot[m][0] += v["new_tokens"]
        tot[m][1] += v["seconds"]
        tot[m][2] += v["steps"]
ar = tot["ar"][0] / tot["ar"][1]
for m, (t, s, st) in tot.items():
    print(
        f"{m:14s} tok/s {t / s:6.1f} speedup {t / s / ar:.3f} tokens/step {t / st:.3f} ms/step {1000 * s / st:.1f}",
        flush=True,
    )
