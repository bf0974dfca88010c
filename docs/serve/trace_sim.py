"""The server's per-row choice replayed on real acceptance (docs/tree-sources/spec-bench-26.json) at one row.

Each prompt's tree steps become a token-by-token profile (a token inside a step that emitted k tokens
gets k); a tree step at token p then emits profile[p] tokens, a plain one 1. The file does not mark
where one prompt's steps end, so each category's steps are cut every 128 tokens (a prompt that
stopped early at its end-of-text token shifts the cuts after it). Times: the tree and plain
step times the server measured at one stream. Prints tokens per second over plain decoding's.
"""

import json
from pathlib import Path

from redrafter.step_policy import SpeculationPolicy

TREE_SECONDS, PLAIN_SECONDS = 0.0657, 0.047
steps = json.loads((Path(__file__).parents[1] / "tree-sources" / "spec-bench-26.json").read_text())
profiles = []
for category_steps in steps.values():  # prompts of a category in order, 128 tokens each
    profile: list[int] = []
    for step in category_steps:
        profile += [step["total"]] * step["total"]
        if len(profile) >= 128:
            profiles.append(profile[:128])
            profile = []
    if profile:
        profiles.append(profile)


def tokens_per_second(policy: SpeculationPolicy | None) -> float:
    tokens, seconds = 0, 0.0
    for row, profile in enumerate(profiles):
        position = 0
        while position < len(profile):
            tree = policy.choose([row]) if policy else True
            emitted = min(profile[position], len(profile) - position) if tree else 1
            took = TREE_SECONDS if tree else PLAIN_SECONDS
            if policy:
                policy.record([row], tree, [emitted], took)
            position, tokens, seconds = position + emitted, tokens + emitted, seconds + took
        if policy:
            policy.forget(row)
    return tokens / seconds


plain = 1 / PLAIN_SECONDS
print(f"{len(profiles)} prompts; always trees: {tokens_per_second(None) / plain:.3f}x plain")
for settings in ({}, {"row_window": 16}, {"row_window": 8, "prior_steps": 4}):
    rate = tokens_per_second(SpeculationPolicy(**settings))
    print(f"per-row policy {settings or 'default'}: {rate / plain:.3f}x plain")
