"""Step-policy settings side by side, live (Session 25).

Usage: python docs/serve/policy_ab.py PROMPTS.jsonl PER_CATEGORY MAX_NEW_TOKENS OUT.json

Engines on one target (bfloat16, the shipped drafter, greedy, one row): `ar`, a tree every step, and
the adaptive choice with the policy settings in SETTINGS (set on each engine's own policy, which
keeps what it measured from prompt to prompt, as `redrafter bench` does). Prompts in order, the
engines' order rotated per prompt. Prints tokens/s and tokens per step per prompt and in all, and
each policy's steps per kind.
"""

import json
import sys

import torch
from redrafter.api import ReDrafter
from redrafter.bench import variant
from redrafter.prompts import per_category, read_prompts
torch.set_num_threads(2)
rd = ReDrafter.from_pretrained("default")
engines = {"ar": variant(rd, drafter=None), "always": variant(rd, adaptive=False)}
settings = {"old": dict(accept_window=64, stale_weight=0.0, lone_lead=0.1), "new": {}}
for name, changes in settings.items():
    engine = variant(rd)
    for k, v in changes.items():
        setattr(engine.decoder.policy, k, v)
    engines[name] = engine
prompts = per_category(read_prompts(sys.argv[1]), int(sys.argv[2]))
totals = {n: [0, 0.0, 0] for n in engines}
rows = []
for i, p in enumerate(prompts):
    ids = rd.encode(p.text)
    names = list(engines)
    names = names[i % len(names):] + names[: i % len(names)]
    row = {"category": p.category}
    for n in names:
        g = engines[n].generate_ids([ids], max_new_tokens=int(sys.argv[3]))[0]
        totals[n][0] += g.new_tokens; totals[n][1] += g.seconds; totals[n][2] += g.steps
        row[n] = (g.new_tokens, round(g.seconds, 2), g.steps)
    rows.append(row)
    print(i, p.category, " ".join(f"{n} {row[n][0] / row[n][1]:.1f}/{row[n][0] / row[n][2]:.2f}" for n in engines), flush=True)
for n, e in engines.items():
    if e.decoder.policy is not None:
        print(n, {f"{size}/{kind}": w.count for (size, kind), w in e.decoder.policy.seconds.items()})
ar = totals["ar"][0] / totals["ar"][1]
for n, (tok, sec, steps) in totals.items():
    print(f"{n:10s} {tok / sec:6.2f} tok/s  {tok / sec / ar:.3f}x ar  {tok / steps:.2f} tok/step")
json.dump({"totals": totals, "rows": rows, "settings": settings}, open(sys.argv[4], "w"), indent=1)
