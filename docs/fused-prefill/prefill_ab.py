"""A/B in one process: w4a8 prefills through the fused layers (up to FUSED_PREFILL_MAX_TOKENS tokens)
against the unfused layers with SDPA, interleaved per prompt (the order swapped every other prompt),
for plain decoding (`ar`) and `redrafter`: time to first token, tokens per second, and whether each
method's output equals `ar`'s with the same prefill.

    python docs/fused-prefill/prefill_ab.py [PROMPTS.jsonl] [--per-category N] [--max-new-tokens N]

It measured commit a8aea92, where FUSED_PREFILL_MAX_TOKENS limited the fused prefill; since Session 33
every w4a8 prefill runs fused (in parts of FUSED_PART_TOKENS), so run it at that commit.
"""

import argparse
import statistics

from redrafter import lean_decoder
from redrafter.api import ReDrafter
from redrafter.bench import plain_engine
from redrafter.prompts import per_category, read_prompts

parser = argparse.ArgumentParser()
parser.add_argument("prompts", nargs="?", default="../shared/data/spec_bench.jsonl")
parser.add_argument("--per-category", type=int, default=2)
parser.add_argument("--max-new-tokens", type=int, default=128)
args = parser.parse_args()

rd = ReDrafter.from_pretrained("default")
engines = {"ar": plain_engine(rd), "redrafter": rd}
limits = {"fused prefill": lean_decoder.FUSED_PREFILL_MAX_TOKENS, "unfused prefill": 0}
prompts = per_category(read_prompts(args.prompts), args.per_category)
first = {(s, e): [] for s in limits for e in engines}
totals = {(s, e): [0.0, 0] for s in limits for e in engines}
identical = {s: 0 for s in limits}
same_across = 0
lengths = []
for i, prompt in enumerate(prompts):
    ids = rd.encode(prompt.text)
    lengths.append(len(ids))
    outputs = {}
    for setting in list(limits) if i % 2 == 0 else list(limits)[::-1]:
        lean_decoder.FUSED_PREFILL_MAX_TOKENS = limits[setting]
        for name, engine in engines.items():
            result = engine.generate_ids([ids], args.max_new_tokens)[0]
            first[setting, name].append(result.first_token_seconds * 1e3)
            totals[setting, name][0] += result.seconds
            totals[setting, name][1] += result.new_tokens
            outputs[setting, name] = result.token_ids
        identical[setting] += outputs[setting, "redrafter"] == outputs[setting, "ar"]
    same_across += outputs["fused prefill", "ar"] == outputs["unfused prefill", "ar"]

print(f"{len(prompts)} prompts of {args.prompts} ({args.per_category} a category), {args.max_new_tokens} new tokens")
print(f"prompt tokens: median {statistics.median(lengths):.0f}, max {max(lengths)}")
for setting in limits:
    for name in engines:
        ttft = sorted(first[setting, name])
        seconds, tokens = totals[setting, name]
        print(
            f"{setting:16s} {name:10s} TTFT p50 {statistics.median(ttft):6.1f} ms,"
            f" mean {statistics.mean(ttft):6.1f} ms; {tokens / seconds:6.1f} tokens/s"
        )
    print(f"{setting:16s} redrafter output equals ar's on {identical[setting]} of {len(prompts)} prompts")
print(f"ar's output the same with either prefill on {same_across} of {len(prompts)} prompts")
