"""The tree with the drafter's token (num_beams 1, the w4a8 default before Session 31) against the lookup
beams alone (num_beams 0, the default since) and plain decoding, interleaved per prompt (the order
reversed every other prompt), greedy, a tree every step; the first PER prompts of each category.

    python docs/host-steps/lookup_only.py ../shared/data/mt_bench.jsonl 2 128
    python docs/host-steps/lookup_only.py ../shared/data/spec_bench.jsonl 1 128
"""

import json
import sys
import time

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine, variant

path, per, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
drafter = ReDrafter.from_pretrained("default", adaptive=False, num_beams=1)
engines = {"drafter's token": drafter, "lookup beams alone": variant(drafter, num_beams=0), "ar": plain_engine(drafter)}
by_category: dict[str | None, list[str]] = {}
for line in open(path):
    row = json.loads(line)
    by_category.setdefault(row.get("category"), []).append(row["turns"][0])
prompts = [prompt for group in by_category.values() for prompt in group[:per]]
for engine in engines.values():
    engine.generate(prompts[0], max_new_tokens=16)  # warm-up
totals = {name: [0, 0.0, 0] for name in engines}  # tokens, seconds, steps
outputs: dict[str, list[list[int]]] = {name: [] for name in engines}
for index, prompt in enumerate(prompts):
    ids = drafter.encode(prompt)
    order = list(engines.items()) if index % 2 == 0 else list(reversed(engines.items()))
    for name, engine in order:
        start = time.perf_counter()
        result = engine.generate_ids([ids], new_tokens)[0]
        totals[name][1] += time.perf_counter() - start
        totals[name][0] += result.new_tokens
        totals[name][2] += result.steps
        outputs[name].append(result.token_ids)
plain = totals["ar"][0] / totals["ar"][1]
for name, (tokens, seconds, steps) in totals.items():
    rate = tokens / seconds
    print(f"{name:20s} {rate:7.1f} tokens/s  {tokens / steps:5.2f} tokens/step  {rate / plain:.3f}x ar")
same = {name: sum(a == b for a, b in zip(out, outputs["ar"], strict=True)) for name, out in outputs.items()}
print(f"equal to ar: {same} of {len(prompts)}")
