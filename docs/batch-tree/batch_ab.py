"""Tokens per second of B rows decoded together (``generate_ids`` on groups of B MT-Bench prompts, the
engines interleaved per group, their order reversed every other group), over plain decoding's (``ar``):
the default engine (the confidence tree sized for each batch size, the measured step choice), and
any of ``one-curve`` (the tree sized by the one-row curve at every batch size, as before
BATCH_NODE_COSTS) or ``SETTING=N`` (a bench variant, e.g. ``adaptive=0``: the tree every step);
``temperature=T`` samples (exactly, seeded per group) instead of decoding greedily.
Prints each engine's tokens/s, its ratio to ``ar`` over all groups and the median of the groups'
ratios, and each adaptive engine's measured rates per batch size (SpeculationPolicy.table).

    python docs/batch-tree/batch_ab.py 4 16 64 one-curve adaptive=0
    python docs/batch-tree/batch_ab.py 1 24 128 adaptive=0 temperature=1
"""

import statistics
import sys
import time

from redrafter.api import NODE_COSTS, ReDrafter
from redrafter.bench import plain_engine, variant
from redrafter.prompts import read_prompts
from redrafter.sampling import SamplingParams

rd = ReDrafter.from_pretrained()
texts = [p.text for p in read_prompts("../shared/data/mt_bench.jsonl")]
rows, groups, new_tokens = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
engines = {"redrafter": rd, "ar": plain_engine(rd)}
temperature = 0.0
for name in sys.argv[4:]:
    if name.startswith("temperature="):
        temperature = float(name.partition("=")[2])
    elif name == "one-curve":
        engines[name] = variant(rd)
        engines[name].decoder.node_costs = NODE_COSTS
    else:
        setting, value = name.split("=")
        engines[name] = variant(rd, **{setting: int(value)})
for engine in engines.values():
    engine.generate_ids([rd.encode(t) for t in texts[:rows]], 8, SamplingParams(temperature, seed=0))  # warm-up
totals = {name: [0, 0.0] for name in engines}
ratios: dict[str, list[float]] = {name: [] for name in engines}
for group in range(groups):
    start_at = (group * rows) % len(texts)
    batch = [rd.encode(t) for t in texts[start_at : start_at + rows]]
    rates = {}
    for name in list(engines) if group % 2 == 0 else list(engines)[::-1]:
        start = time.perf_counter()
        out = engines[name].generate_ids(batch, new_tokens, SamplingParams(temperature, seed=group))
        seconds = time.perf_counter() - start
        tokens = sum(g.new_tokens for g in out)
        totals[name][0] += tokens
        totals[name][1] += seconds
        rates[name] = tokens / seconds
    for name in engines:
        ratios[name].append(rates[name] / rates["ar"])
plain_rate = totals["ar"][0] / totals["ar"][1]
for name, (tokens, seconds) in totals.items():
    print(
        f"{name}: {tokens / seconds:.1f} tokens/s, {tokens / seconds / plain_rate:.3f}x ar, "
        f"median group ratio {statistics.median(ratios[name]):.3f}"
    )
for name, engine in engines.items():
    if engine.decoder.policy is not None:
        print(name, engine.decoder.policy.table())
