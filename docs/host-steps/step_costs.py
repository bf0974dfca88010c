"""Where a decode step's time goes outside the target's kernels, timed inside the decode loop: each
piece of a step wrapped with a clock, over 12 Spec-Bench prompts (every 40th), 128 new tokens, the
default engine (w4a8 on this CPU). Timed in isolation the same pieces take a half to a third of this:
the target's forward streams ~90 MB of weights through the caches between two of them.

    python docs/host-steps/step_costs.py                 # the default tree (the lookup beams alone)
    python docs/host-steps/step_costs.py --beams 1       # with the drafter's token

Prints, per piece: calls, milliseconds per decode step (prefills counted in the target's forward).
"""

import functools
import json
import sys
import time

import torch

import redrafter.decode as decode
import redrafter.kv_cache as kv_cache
import redrafter.lookup as lookup
import redrafter.sampling as sampling
from redrafter.api import ReDrafter

beams = int(sys.argv[sys.argv.index("--beams") + 1]) if "--beams" in sys.argv else None
rd = ReDrafter.from_pretrained("default", num_beams=beams)
times: dict[str, list[float]] = {}


def clock(owner, name: str, label: str) -> None:
    function = getattr(owner, name)

    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        times.setdefault(label, []).append(time.perf_counter() - start)
        return result

    setattr(owner, name, timed)


clock(decode.DrafterProposer, "__call__", "drafter")
clock(lookup.LookupBeams, "beams", "lookup beams")
clock(decode, "build_tree", "pack the tree")
clock(decode, "verify", "verify")
clock(kv_cache.TreeKVCache, "keep", "cache: keep path")
clock(sampling.TokenChooser, "__call__", "head and argmax")
clock(decode.SpeculativeDecoder, "_forward", "target forward (with prefills)")
clock(decode.RunningBatch, "step", "whole step")
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/spec_bench.jsonl")][::40][:12]
rd.generate(prompts[0], max_new_tokens=32)  # warm-up
times.clear()
for prompt in prompts:
    rd.generate(prompt, max_new_tokens=128)
steps = len(times["whole step"])
print(f"{steps} steps, num_beams {rd.num_beams}, torch {torch.__version__}")
for label, values in sorted(times.items(), key=lambda item: -sum(item[1])):
    print(f"{label:32s} calls {len(values):5d}  {sum(values) / steps * 1e3:7.3f} ms a step")
