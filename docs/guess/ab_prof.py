"""The decode loop with and without the drafter's guess, and plain decoding, interleaved per prompt (the
order rotating), each engine with its own stage clock: tokens per second and per step, milliseconds a step
per stage, and the target forward's median milliseconds by the tokens it verified.

    python docs/guess/ab_prof.py 16      # the first 16 MT-Bench prompts, 256 new tokens each
"""

import collections
import json
import statistics
import sys
import time

import redrafter.decode as decode
from redrafter.api import ReDrafter
from redrafter.bench import plain_engine, variant
from redrafter.decode import StageClock

count = int(sys.argv[1]) if len(sys.argv) > 1 else 16
rd = ReDrafter.from_pretrained()
engines = {"guess": rd, "noguess": variant(rd, drafter_guess=False), "ar": plain_engine(rd)}
running = [""]
forwards = {name: collections.defaultdict(list) for name in engines}
forward = decode.SpeculativeDecoder._forward


def timed_forward(self, cache, input_ids, *rest):
    start = time.perf_counter()
    out = forward(self, cache, input_ids, *rest)
    forwards[running[0]][input_ids.shape[1]].append(time.perf_counter() - start)
    return out


decode.SpeculativeDecoder._forward = timed_forward
clocks = {name: StageClock() for name in engines}
for name, engine in engines.items():
    engine.decoder.clock = clocks[name]
tokens, seconds = collections.Counter(), collections.Counter()
prompts = [json.loads(line)["turns"][0] for line in open("../shared/data/mt_bench.jsonl")][:count]
for i, prompt in enumerate(prompts):
    for name in list(engines)[i % 3 :] + list(engines)[: i % 3]:
        running[0] = name
        start = time.perf_counter()
        out = engines[name].generate_ids([engines[name].encode(prompt)], max_new_tokens=256)[0].token_ids
        seconds[name] += time.perf_counter() - start
        tokens[name] += len(out)
for name in engines:
    clock = clocks[name]
    print(
        f"{name}: {tokens[name] / seconds[name]:.1f} tokens/s, {tokens[name] / clock.steps:.3f} a step, "
        f"{1e3 * sum(clock.seconds.values()) / clock.steps:.3f} ms a step"
    )
    print("    ms a step:", {stage: round(1e3 * s / clock.steps, 3) for stage, s in clock.seconds.items()})
    by_size = {q: (len(t), round(1e3 * statistics.median(t), 3)) for q, t in sorted(forwards[name].items()) if q < 20}
    print("    forward by tokens verified (calls, median ms):", by_size)
