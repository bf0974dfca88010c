"""The drafter's one token (beams=1, draft_len=2) only where its top probability reaches tau, against
no drafter token (the w4a8 default, beams=0) and always one (beams=1); interleaved per prompt, 2 MT-Bench
prompts a category, 128 new tokens.

    python docs/tried-32/drafter_gate.py ../shared/data/mt_bench.jsonl 0.5 0.7 0.85
"""

import dataclasses
import sys

import torch

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine, variant
from redrafter.prompts import per_category, read_prompts
from redrafter.tree import PAD

rd = ReDrafter.from_pretrained("default")
ar = plain_engine(rd)
rd1 = variant(rd, num_beams=1)
stats = {}


def gated_engine(tau):
    eng = variant(rd, num_beams=1)
    dr = eng.decoder.trees[0].proposer.drafter
    name = f"gated {tau}"
    stats[name] = [0, 0]

    @torch.no_grad()
    def proposer(hidden, last_token, positions):
        h = dr.condition(hidden)
        st = dr.rnn_step(None, dr.embed(last_token))
        p, idx = dr.head(h, st).float().softmax(-1).max(-1)
        tok = torch.where(p >= tau, dr.to_target_ids(idx), torch.full_like(last_token, PAD))
        stats[name][0] += int((p >= tau).sum())
        stats[name][1] += len(p)
        return torch.stack([last_token, tok], -1)[:, None, :]

    dec = eng.decoder
    dec.trees[0] = dataclasses.replace(dec.trees[0], proposer=proposer)
    return eng


path = sys.argv[1]
engines = {"ar": ar, "beams=0": rd, "beams=1": rd1}
for tau in map(float, sys.argv[2:]):
    engines[f"gated {tau}"] = gated_engine(tau)
prompts = per_category(read_prompts(path), 2)
tot = {k: [0.0, 0, 0] for k in engines}
ref_ok = 0
for i, p in enumerate(prompts):
    ids = rd.encode(p.text)
    names = list(engines) if i % 2 == 0 else list(engines)[::-1]
    outs = {}
    for n in names:
        g = engines[n].generate_ids([ids], 128)[0]
        tot[n][0] += g.seconds
        tot[n][1] += g.new_tokens
        tot[n][2] += g.steps
        outs[n] = g.token_ids
    ref_ok += all(v == outs["ar"] for v in outs.values())
for n, (s, k, st) in tot.items():
    print(f"{n:12s} {k / s:7.1f} tok/s  {k / st:.2f} tok/step  {tot['ar'][0] / s:.3f}x ar")
print("identical to ar on", ref_ok, "of", len(prompts), {k: round(a / max(b, 1), 3) for k, (a, b) in stats.items()})
