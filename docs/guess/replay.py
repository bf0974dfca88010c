"""Replays for the drafter's guess (``redrafter.guess``) along fixed greedy outputs (``docs/confidence/dump.py``):
does its probability want calibrating, and for which rows should it run?

    python docs/guess/replay.py calibration heldout.jsonl mt80.jsonl spec180.jsonl
    python docs/guess/replay.py gate mt80.jsonl spec180.jsonl

``calibration``: fits the rate at which the drafter's first guess is right per tenth of its probability on
the first 250 held-out corpus conversations (apart, and split by whether a lookup guess names the same
token), then replays each later file with the guess priced by its raw probability, by the fitted rate, or
by the split rates. ``gate``: the guess only where the likeliest lookup guess at the root is below ``tau``.
Each prints tokens a step and the speed-up estimated as in ``docs/confidence/drafter_guess.py`` (a step of
``n`` tokens at ``NODE_COSTS[n - 1]`` plain steps, plus the drafter's step at 0.03, 0.04 or 0.05 of one
where it ran).
"""

import bisect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "confidence"))
from drafter_guess import drafter_guesses  # noqa: E402

from redrafter.api import NODE_COSTS, ReDrafter  # noqa: E402
from redrafter.confidence import ConfidenceTree, cost  # noqa: E402
from redrafter.decode import UNKNOWN  # noqa: E402
from redrafter.tree import build_tree  # noqa: E402
from redrafter.verify import verify  # noqa: E402

EDGES = [0.1 * i for i in range(1, 10)]
DRAFTER_COSTS = (0.03, 0.04, 0.05)
TAUS = (0.0, 2.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)


def replay(rd, record, guesses, price):
    """Tokens, steps, steps with a guess and the estimated costs; ``price(tree, token, probability)`` gives
    the guess's probability, or None to skip it."""
    prompt, answer = record["prompt"], record["answer"]
    tokens, probabilities = guesses
    truth = torch.tensor([answer + [UNKNOWN]])
    tree = ConfidenceTree([prompt], rd.drafter.ngrams, NODE_COSTS, 12, 8192)
    tree.extend(0, answer[:1])
    done, steps, guessed, spent = 1, 1, 0, [1.0] * len(DRAFTER_COSTS)
    while done < len(answer):
        at = len(prompt) + done - 2  # the hidden state before the root
        probability = price(tree, tokens[at], probabilities[at])
        guess = None if probability is None else [(tokens[at], probability)]
        beams = tree.beams(torch.tensor([[[answer[done - 1]]]]), guesses=guess)
        packed = build_tree(beams)
        choice = truth[:, (done + packed.depth[0]).clamp(max=len(answer))]
        emitted = min(int(verify(beams, packed.node_index, choice).num_tokens[0]), len(answer) - done)
        tree.extend(0, answer[done : done + emitted])
        step = cost(NODE_COSTS, int(packed.num_nodes[0]))
        spent = [s + step + (c if guess else 0.0) for s, c in zip(spent, DRAFTER_COSTS, strict=True)]
        done, steps, guessed = done + emitted, steps + 1, guessed + (guess is not None)
    return len(answer), steps, guessed, spent


def report(name, runs):
    tokens, steps, guessed = (sum(run[k] for run in runs) for k in range(3))
    estimates = [tokens / sum(run[3][i] for run in runs) for i in range(len(DRAFTER_COSTS))]
    print(
        f"{name}: {tokens / steps:.3f} tokens a step, a guess in {guessed / steps:.2f} of the steps, estimated "
        + ", ".join(f"{e:.3f}x (drafter {c})" for e, c in zip(estimates, DRAFTER_COSTS, strict=True)),
        flush=True,
    )


def fit(rd, records, guesses):
    """Per tenth of probability: the guess's rate of being right, over all guesses, those no lookup guess
    names and those one does (each shrunk by two guesses towards the tenth's middle)."""
    counts = {False: [[0, 0] for _ in range(10)], True: [[0, 0] for _ in range(10)]}
    for record, (tokens, probabilities) in zip(records, guesses, strict=True):
        prompt, answer = record["prompt"], record["answer"]
        tree = ConfidenceTree([prompt], rd.drafter.ngrams, NODE_COSTS, 12, 8192)
        tree.extend(0, answer[:1])
        for done in range(1, len(answer)):
            at = len(prompt) + done - 2
            counts_here = counts[tokens[at] in dict(tree.guesses(0))][bisect.bisect(EDGES, probabilities[at])]
            counts_here[0] += 1
            counts_here[1] += tokens[at] == answer[done]
            tree.extend(0, answer[done : done + 1])

    def rates(cells):
        return [(right + 2 * (i + 0.5) / 10) / (seen + 2) for i, (seen, right) in enumerate(cells)]

    both = [[a[0] + b[0], a[1] + b[1]] for a, b in zip(counts[False], counts[True], strict=True)]
    return rates(both), rates(counts[False]), rates(counts[True])


def gate(tau: float):
    """The guess at its raw probability where the likeliest lookup guess at the root is below ``tau``."""
    return lambda tree, token, probability: probability if tree.root_confidence(0) < tau else None


def main() -> None:
    mode, paths = sys.argv[1], sys.argv[2:]
    rd = ReDrafter.from_pretrained(weights="float")
    if mode == "calibration":
        held = [json.loads(line) for line in open(paths[0])][:250]
        table, alone, agreeing = fit(rd, held, [drafter_guesses(rd, r) for r in held])
        for name, rates in (("all", table), ("no lookup guess names it", alone), ("a lookup guess names it", agreeing)):
            print(f"rate right per tenth of probability, {name}:", [round(x, 3) for x in rates])
        paths = paths[1:]
    for path in paths:
        records = [json.loads(line) for line in open(path)]
        guesses = [drafter_guesses(rd, r) for r in records]
        if mode == "calibration":
            prices = {
                "no guess": lambda tree, token, p: None,
                "raw probability": lambda tree, token, p: p,
                "fitted rate": lambda tree, token, p: table[bisect.bisect(EDGES, p)],
                "split rates": lambda tree, token, p: (agreeing if token in dict(tree.guesses(0)) else alone)[
                    bisect.bisect(EDGES, p)
                ],
            }
        else:
            prices = {f"tau {tau}": gate(tau) for tau in TAUS}
        for name, price in prices.items():
            report(
                f"{Path(path).name}, {name}", [replay(rd, r, g, price) for r, g in zip(records, guesses, strict=True)]
            )


if __name__ == "__main__":
    main()
