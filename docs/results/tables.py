"""Markdown tables of a `redrafter bench` run (its results.json): each method's speed, latency and CPU
time, then per category each method's tokens/s over `ar`'s and tokens per target forward (every
forward counted, the prefill included), summed over the category's prompts.

    python docs/results/tables.py runs/spec-bench/results.json
"""

import json
import sys
from collections import defaultdict

results = json.load(open(sys.argv[1]))
methods = list(results["methods"])
print(
    "| method | tokens/s | over `ar` | tokens per forward | first token p50 (p99), ms "
    "| ms a token after it, p50 (p99) | CPU s a token |"
)
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
plain = results["methods"]["ar"]["tokens_per_second"]
for name in methods:
    m = results["methods"][name]
    print(
        f"| `{name}` | {m['tokens_per_second']:.1f} | {m['tokens_per_second'] / plain:.2f}x "
        f"| {m['tokens_per_step']:.2f} "
        f"| {m['ttft_p50_ms']:.0f} ({m['ttft_p99_ms']:.0f}) | {m['tpot_p50_ms']:.1f} ({m['tpot_p99_ms']:.1f}) "
        f"| {m['cpu_seconds_per_token']:.4f} |"
    )
sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # tokens, seconds, steps
counts: dict[str, int] = defaultdict(int)
for prompt in results["prompts"]:
    counts[prompt["category"]] += 1
    for name, run in prompt["methods"].items():
        total = sums[prompt["category"], name]
        total[0] += run["new_tokens"]
        total[1] += run["seconds"]
        total[2] += run["steps"]
print()
print("| category (prompts) | " + " | ".join(f"`{name}`" for name in methods) + " |")
print("| --- | " + " | ".join("---:" for _ in methods) + " |")
for category in counts:
    plain_rate = sums[category, "ar"][0] / sums[category, "ar"][1]
    cells = []
    for name in methods:
        tokens, seconds, steps = sums[category, name]
        rate = tokens / seconds
        cells.append(f"{rate:.0f}" if name == "ar" else f"{rate / plain_rate:.2f}x, {tokens / steps:.2f}")
    print(f"| {category} ({counts[category]}) | " + " | ".join(cells) + " |")
