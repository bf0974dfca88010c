"""The step policy replayed on teacher-forced acceptance profiles (``shape_profiles.py``).

Usage: python docs/serve/shape_sim.py PROFILES.json [ROWS ...]

Each prompt is a row; ROWS of them decode together (a server at that many streams: a row that
finishes is replaced by the next prompt). A tree step at a row's position p emits ``tree[p]``, a
small-tree step ``small[p]``, a plain step 1. Step times are those the adaptive server's trace
measured at each batch size (``STEP_MS``, Session 22, bfloat16, MT-Bench), times the machine's
speed, which moves: it is multiplied by a random factor (log-normal, 25%) every 5 simulated seconds,
and each step by its own (10%). The policy sees those times; what is reported divides the speed
out again (each step counted at its time on the machine at speed 1, its own noise kept), so that a
run that took longer and met other speeds is not flattered or penalized by them. Prints each
policy's tokens per second over plain steps', the mean over 4 seeded machines.
"""

import json
import math
import random
import sys
from collections.abc import Callable

from redrafter.step_policy import SpeculationPolicy

# rows -> (plain, tree, small tree) milliseconds per step (runs/s22/final/trace.json, medians; other
# sizes interpolated)
STEP_MS = {
    1: (68.0, 96.5, 71.4),
    2: (70.0, 137.9, 92.0),
    3: (70.3, 191.4, 85.0),
    4: (71.1, 203.6, 93.4),
    16: (97.9, 456.3, 155.8),
}


def step_ms(rows: int, kind: int) -> float:
    """Milliseconds of a step of ``kind`` over ``rows``, interpolated between the sizes measured."""
    if rows in STEP_MS:
        return STEP_MS[rows][kind]
    low = max(size for size in STEP_MS if size < rows)
    high = min(size for size in STEP_MS if size > rows)
    return STEP_MS[low][kind] + (STEP_MS[high][kind] - STEP_MS[low][kind]) * (rows - low) / (high - low)


class Machine:
    """The machine's speed over simulated time, and each step's own noise (seeded)."""

    def __init__(self, seed: int) -> None:
        self.draw, self.noise, self.phases = random.Random(seed), random.Random(seed + 1), [1.0]

    def seconds(self, now: float, rows: int, kind: int) -> tuple[float, float]:
        """A step's seconds on the machine at ``now``, and at speed 1."""
        phase = int(now / 5.0)
        while len(self.phases) <= phase:
            self.phases.append(min(2.0, max(0.5, self.phases[-1] * math.exp(self.draw.gauss(0, 0.25)))))
        at_speed_one = step_ms(rows, kind) / 1000 * math.exp(self.noise.gauss(0, 0.1))
        return at_speed_one * self.phases[phase], at_speed_one


Chooser = Callable[[list[int], list[int]], int]  # (row ids, their positions) -> kind


def run(
    records: list[dict], rows: int, chooser: Chooser | None, policy: SpeculationPolicy | None, seed: int
) -> tuple[int, float, list[int]]:
    """Tokens and seconds (at speed 1) over all prompts at ``rows`` streams, and the steps of each kind."""
    machine, queue = Machine(seed), list(range(len(records)))
    running: dict[int, int] = {}  # row -> next position (1: the prefill emitted token 0)
    now, work, tokens, kinds = 0.0, 0.0, 0, [0, 0, 0]
    while queue or running:
        while queue and len(running) < rows:
            running[queue.pop(0)] = 1
            tokens += 1
        ids = sorted(running)
        kind = policy.choose(ids) if policy else chooser(ids, [running[i] for i in ids])  # type: ignore[misc]
        emitted, nested = [], []
        for row in ids:
            tree, small, at = records[row]["tree"], records[row]["small"], running[row] - 1
            done = at >= len(tree)
            emitted.append(1 if kind == 0 or done else (tree if kind == 1 else small)[at])
            nested.append(1 if done else small[at])
        seconds, at_speed_one = machine.seconds(now, len(ids), kind)
        if policy:
            policy.record(ids, kind, emitted, seconds, {2: nested} if kind == 1 and len(policy.kinds) > 2 else None)
        now, work, tokens, kinds[kind] = now + seconds, work + at_speed_one, tokens + sum(emitted), kinds[kind] + 1
        for row, count in zip(ids, emitted, strict=True):
            running[row] += count
            if running[row] > len(records[row]["tree"]):
                del running[row]
                if policy:
                    policy.forget(row)
    return tokens, work, kinds


def main() -> None:
    records = json.loads(open(sys.argv[1]).read())["records"]
    fixed: dict[str, Chooser] = {"tree": lambda ids, at: 1, "small tree": lambda ids, at: 2}
    policies: dict[str, Callable[[], SpeculationPolicy]] = {
        "policy (tree, plain)": lambda: SpeculationPolicy(kinds=("plain", "tree")),
        "policy (small tree too)": lambda: SpeculationPolicy(kinds=("plain", "tree", "small_tree")),
    }
    seeds = range(1, 5)
    for rows in [int(a) for a in sys.argv[2:]] or [1, 4]:
        ratios: dict[str, list[float]] = {name: [] for name in [*fixed, *policies]}
        shares: dict[str, list[int]] = {name: [0, 0, 0] for name in policies}
        for seed in seeds:
            tokens, seconds, _ = run(records, rows, lambda ids, at: 0, None, seed)
            plain = tokens / seconds
            for name, chooser in fixed.items():
                tokens, seconds, _ = run(records, rows, chooser, None, seed)
                ratios[name].append(tokens / seconds / plain)
            for name, make in policies.items():
                tokens, seconds, kinds = run(records, rows, None, make(), seed)
                ratios[name].append(tokens / seconds / plain)
                shares[name] = [a + b for a, b in zip(shares[name], kinds, strict=True)]
        print(f"{rows} rows, {len(records)} prompts, tokens/s over plain steps' (mean of {len(seeds)} machines):")
        for name, values in ratios.items():
            steps = shares.get(name)
            kinds = (
                "" if steps is None else "  steps plain/tree/small: " + "/".join(f"{n / sum(steps):.2f}" for n in steps)
            )
            print(f"  {name:<24} {sum(values) / len(values):.3f}x{kinds}")


if __name__ == "__main__":
    main()
