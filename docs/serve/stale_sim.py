"""The step policy's staleness (Session 25) replayed on teacher-forced acceptance profiles.

Usage: python docs/serve/stale_sim.py PROFILES.json [ROWS ...]

As ``shape_sim.py``, with step times scaled to a machine where a tree step at one row costs
``ratio`` plain ones (1.5 and 2.0; plain 57 ms, a small-tree step 62; more rows as the Session 22
trace grew them), for the policy before (no staleness, a lead of 10% at one row too) and after
(``stale_weight`` 0.5, ``lone_lead`` 0), with and without the small tree offered. Prints
tokens per second over a tree every step's, and the share of plain steps. Also: per prompt, whether
a tree every step beats plain steps at each ratio (the best fixed choice a prompt allows).
"""

import json
import sys

import shape_sim

from redrafter.step_policy import SpeculationPolicy

POLICIES = {"before": {"stale_weight": 0.0, "lone_lead": 0.1}, "after": {}}


def step_ms(ratio: float) -> dict[int, tuple[float, float, float]]:
    """rows -> (plain, tree, small tree) ms."""
    tree = 57.0 * ratio
    return {1: (57.0, tree, 62.0), 2: (58.0, tree * 1.4, 70.0), 4: (60.0, tree * 2.1, 80.0), 16: (85.0, tree * 4.7, 140.0)}


def main() -> None:
    records = json.loads(open(sys.argv[1]).read())["records"]
    sizes = [int(a) for a in sys.argv[2:]] or [1, 4]
    seeds = range(1, 5)
    for ratio in (1.5, 2.0):
        losers = []
        for record in records:
            tree, at, steps = record["tree"], 0, 0
            while at < len(tree):
                at, steps = at + tree[at], steps + 1
            losers += [len(tree) / (steps * ratio)] if steps * ratio > len(tree) else []
        worst = f", the worst at {min(losers):.3f}x" if losers else ""
        print(f"tree step = {ratio} plain steps: a tree every step is slower than plain steps on {len(losers)} of {len(records)} prompts{worst}")
        shape_sim.STEP_MS = step_ms(ratio)
        for rows in sizes:
            always = sum(t / s for t, s, _ in (shape_sim.run(records, rows, lambda ids, at: 1, None, seed) for seed in seeds))
            line = []
            for kinds in (("plain", "tree"), ("plain", "tree", "small_tree")):
                for name, settings in POLICIES.items():
                    rate, steps = 0.0, [0, 0, 0]
                    for seed in seeds:
                        tokens, seconds, kinds_taken = shape_sim.run(
                            records, rows, None, SpeculationPolicy(kinds=kinds, **settings), seed
                        )
                        rate += tokens / seconds
                        steps = [a + b for a, b in zip(steps, kinds_taken, strict=True)]
                    line.append(f"{len(kinds) - 1} tree(s) {name} {rate / always:.3f}x ({steps[0] / sum(steps):.2f} plain)")
            print(f"  {rows} rows: " + "   ".join(line))


if __name__ == "__main__":
    main()
