"""Per category: tokens/s of each method, and each drafting method over its own precision's plain decoding.

Usage: python docs/default-weights/table.py docs/default-weights/spec-bench-26.json
(a ``redrafter bench`` run with methods redrafter, ar and the variant int4 weights=int4, which adds ar-int4).
"""

import json
import sys

results = json.load(open(sys.argv[1]))
methods = list(results["methods"])
categories = sorted({r["category"] for r in results["prompts"]})


def rows(method: str, category: str | None) -> list[dict]:
    return [r["methods"][method] for r in results["prompts"] if category is None or r["category"] == category]


def tokens_per_second(method: str, category: str | None = None) -> float:
    chosen = rows(method, category)
    return sum(x["new_tokens"] for x in chosen) / sum(x["seconds"] for x in chosen)


ratios = [("redrafter", "ar"), ("int4", "ar-int4"), ("int4", "redrafter")]
print("| category | " + " | ".join(methods) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
print("| --- |" + " ---: |" * (len(methods) + len(ratios)))
for category in [*categories, None]:
    rates = [f"{tokens_per_second(m, category):.1f}" for m in methods]
    shares = [f"{tokens_per_second(a, category) / tokens_per_second(b, category):.2f}x" for a, b in ratios]
    print(f"| {category or '**all**'} | " + " | ".join(rates + shares) + " |")
print()
for method in methods:
    row = results["methods"][method]
    differ = [r["methods"][method] for r in results["prompts"] if not r["methods"][method]["identical"]]
    print(
        f"{method}: tokens/step {row['tokens_per_step']}, replayed {row.get('replayed_tokens_per_step')}, "
        f"TTFT p50/p99 {row['ttft_p50_ms']}/{row['ttft_p99_ms']} ms, ms/token p50 {row['tpot_p50_ms']}, "
        f"CPU s/token {row['cpu_seconds_per_token']}; {len(differ)} prompts differ from "
        f"{row.get('reference', 'ar')}, {sum(bool(x.get('near_tie')) for x in differ)} first on a near-tie"
    )
