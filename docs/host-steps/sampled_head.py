"""Sampled decoding (temperature 1, the OpenAI API's default) with the bfloat16 head in our kernel
(``redrafter.head``) against PyTorch's product, interleaved per prompt in one process: plain decoding
and ``redrafter`` (its default tree), 8 MT-Bench prompts (every 10th), 128 new tokens, seed 0.

    python docs/host-steps/sampled_head.py
"""

import json
import time

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine
from redrafter.sampling import SamplingParams

rd = ReDrafter.from_pretrained("default")
ar = plain_engine(rd)
kernel_heads = {name: engine.decoder.head for name, engine in (("redrafter", rd), ("ar", ar))}
sampling = SamplingParams(temperature=1.0, seed=0)
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench.jsonl")][::10][:8]
totals: dict[str, list[float]] = {}
for engine in (rd, ar):
    engine.generate(prompts[0], max_new_tokens=16, sampling=sampling)  # warm-up
for index, prompt in enumerate(prompts):
    runs = [(name, engine, head) for name, engine in (("redrafter", rd), ("ar", ar)) for head in ("kernel", "torch")]
    for name, engine, head in runs if index % 2 == 0 else reversed(runs):
        engine.decoder.head = kernel_heads[name] if head == "kernel" else None
        start = time.perf_counter()
        result = engine.generate(prompt, max_new_tokens=128, sampling=sampling)
        entry = totals.setdefault(f"{name}, {head} head", [0, 0.0, 0])
        entry[0] += result.new_tokens
        entry[1] += time.perf_counter() - start
        entry[2] += result.steps
for label, (tokens, seconds, steps) in totals.items():
    print(f"{label:24s} {tokens / seconds:6.1f} tokens/s  {tokens / steps:.2f} tokens/step")
