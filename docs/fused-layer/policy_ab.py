"""Engines with the measured choice at one row and with a tree every step, interleaved per prompt
(`generate_ids`, 128 new tokens, the order reversed every other prompt), over MT-Bench prompts spread
over the set: tokens/s and the ratio to `ar`.

    python docs/fused-layer/policy_ab.py 1 16   # the first run: 16 prompts
    python docs/fused-layer/policy_ab.py 2 12   # the second: 12 prompts

Run 1 compares the measured choice with two knobs changed (a lead of -0.1 at one row; explorations a
quarter as often); run 2 with the policy's bookkeeping but the tree always taken, and without the
small tree. Both were run before `lone_tree`, with `lone_tree=False` then the only behaviour: here it
is set False for every adaptive engine, so the script measures what it measured then.
"""

import json
import sys

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine, variant

run, count = sys.argv[1], int(sys.argv[2])
rd = ReDrafter.from_pretrained("default", lone_tree=False)
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench.jsonl")]
prompts = prompts[:: max(1, len(prompts) // count)][:count]
encoded = [rd.encode(prompt) for prompt in prompts]
engines = {"default": variant(rd)}
if run == "1":
    engines["lead-0.1"], engines["explore/4"] = variant(rd), variant(rd)
    engines["lead-0.1"].decoder.policy.lone_lead = -0.1
    engines["explore/4"].decoder.policy.explore_share = 1 / 64
else:
    engines["forced tree"], engines["no small tree"] = variant(rd), variant(rd, small_tree=False)
    engines["forced tree"].decoder.policy.choose = lambda rows: 1
engines["always"], engines["ar"] = variant(rd, adaptive=False), plain_engine(rd)
for engine in engines.values():
    engine.generate_ids([encoded[0][:32]], 8)  # warm-up
totals = {name: [0, 0.0] for name in engines}
for i, ids in enumerate(encoded):
    for name, engine in list(engines.items())[:: 1 if i % 2 == 0 else -1]:
        result = engine.generate_ids([ids], 128)[0]
        totals[name][0] += result.new_tokens
        totals[name][1] += result.seconds
ar = totals["ar"][0] / totals["ar"][1]
for name, (tokens, seconds) in totals.items():
    print(f"{name:14s} {tokens / seconds:7.1f} tokens/s  {tokens / seconds / ar:.3f}x")
