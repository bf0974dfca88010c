"""Sampled decoding (temperature 1, seed 0) of `redrafter` (default engine) and plain decoding,
interleaved per prompt (the order reversed every other prompt), 16 MT-Bench prompts (every 5th), 128
new tokens: after a lone sampled row stopped taking the tree every step (``lone_tree`` holds for greedy
rows only; the measured choice decides for sampled ones).

    python docs/host-steps/sampled_policy.py
"""

import json
import time

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine
from redrafter.sampling import SamplingParams

rd = ReDrafter.from_pretrained("default")
engines = {"redrafter": rd, "ar": plain_engine(rd)}
sampling = SamplingParams(temperature=1.0, seed=0)
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench.jsonl")][::5][:16]
for engine in engines.values():
    engine.generate(prompts[0], max_new_tokens=16, sampling=sampling)  # warm-up
totals = {name: [0, 0.0, 0] for name in engines}
for index, prompt in enumerate(prompts):
    order = list(engines.items()) if index % 2 == 0 else list(reversed(engines.items()))
    for name, engine in order:
        start = time.perf_counter()
        result = engine.generate(prompt, max_new_tokens=128, sampling=sampling)
        totals[name][1] += time.perf_counter() - start
        totals[name][0] += result.new_tokens
        totals[name][2] += result.steps
for name, (tokens, seconds, steps) in totals.items():
    print(f"{name:10s} {tokens / seconds:6.1f} tokens/s  {tokens / steps:.2f} tokens/step")
