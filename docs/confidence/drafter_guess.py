"""Replay: the drafter's first guess joining the confidence tree at its root, priced by the drafter's own
softmax probability (where a lookup guess names the same token, the larger of the two), against the
tree alone, along fixed greedy outputs (``dump.py``). The drafter reads the target's hidden states along
``prompt + answer`` (one forward of the bfloat16 model) and the root token, as it drafts in
``SpeculativeDecoder.replay``. The estimate prices a step of n tokens at ``NODE_COSTS[n - 1]`` plain
steps plus the drafter's step at 0, 0.03, 0.1 or 0.2 of a plain one (in the decode loop today its
one-token beam search takes about 0.6 ms, 0.14 of a plain step: ``redrafter bench --profile --beams 1
--draft-len 2``). It first times a bare drafter step in PyTorch, one row, alone (the root's
embedding, the RNN cell, the head over the draft vocabulary, softmax and top-1), float and w4a8.

    python docs/confidence/drafter_guess.py mt80.jsonl
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from redrafter.api import NODE_COSTS, ReDrafter
from redrafter.confidence import ConfidenceTree, cost
from redrafter.decode import UNKNOWN
from redrafter.guess import DrafterGuess
from redrafter.models import decoder_features
from redrafter.quant import quantize_drafter
from redrafter.tree import build_tree
from redrafter.verify import verify

DRAFTER_COSTS = (0.0, 0.03, 0.1, 0.2)


def drafter_guesses(rd: ReDrafter, record: dict) -> tuple[list[int], list[float]]:
    """At each index ``t`` of ``prompt + answer`` (but the last): the drafter's top guess for token
    ``t + 2`` (target id) and its probability, from the hidden state at ``t`` and token ``t + 1``."""
    sequence = torch.tensor([record["prompt"] + record["answer"]])
    with torch.inference_mode():
        hidden = decoder_features(rd.decoder.decoder, (), input_ids=sequence, use_cache=False)
        logits = rd.drafter(hidden[:, :-1], sequence[:, 1:, None])[0, :, 0].float()  # [T - 1, K]
        probability, draft_ids = logits.softmax(-1).max(-1)
    return rd.drafter.to_target_ids(draft_ids).tolist(), probability.tolist()


def replay(rd: ReDrafter, record: dict, guesses, with_guess: bool, calibration: list[float]):
    """Tokens, steps, nodes and the estimated cost per drafter cost (``DRAFTER_COSTS``) of one prompt."""
    prompt, answer = record["prompt"], record["answer"]
    tokens, probabilities = guesses
    truth = torch.tensor([answer + [UNKNOWN]])
    tree = ConfidenceTree([prompt], rd.drafter.ngrams, NODE_COSTS, 12, 8192)
    tree.extend(0, answer[:1])
    done, steps, nodes, spent = 1, 1, 0, [1.0] * len(DRAFTER_COSTS)
    while done < len(answer):
        at = len(prompt) + done - 2  # the hidden state before the root
        guess = [(tokens[at], probabilities[at])] if with_guess else None
        if with_guess:
            calibration[0] += probabilities[at]
            calibration[1] += tokens[at] == answer[done]
            calibration[2] += 1
        beams = tree.beams(torch.tensor([[[answer[done - 1]]]]), guesses=guess)
        packed = build_tree(beams)
        choice = truth[:, (done + packed.depth[0]).clamp(max=len(answer))]
        emitted = min(int(verify(beams, packed.node_index, choice).num_tokens[0]), len(answer) - done)
        tree.extend(0, answer[done : done + emitted])
        size = int(packed.num_nodes[0])
        step = cost(NODE_COSTS, size)
        spent = [s + step + (c if with_guess else 0.0) for s, c in zip(spent, DRAFTER_COSTS, strict=True)]
        done, steps, nodes = done + emitted, steps + 1, nodes + size
    return len(answer), steps, nodes, spent


def time_step(rd: ReDrafter) -> None:
    """Median milliseconds of a bare drafter step (one row, 300 calls after 50): float and w4a8 through
    PyTorch, and w4a8 as one kernel call (``redrafter.guess.DrafterGuess``)."""
    hidden = torch.randn(1, rd.target.config.hidden_size, dtype=rd.target.dtype)
    root = torch.tensor([1234])
    w4a8 = quantize_drafter(rd.drafter, "w4a8")
    kernel = DrafterGuess(w4a8)
    steps = {
        "float": lambda: step(rd.drafter, hidden, root),
        "w4a8": lambda: step(w4a8, hidden, root),
        "w4a8, one kernel call": lambda: kernel(hidden, root),
    }
    for name, run in steps.items():
        times = []
        with torch.inference_mode():
            for _ in range(350):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        print(f"a bare drafter step, {name}: {1e3 * statistics.median(times[50:]):.3f} ms")


def step(drafter, hidden: torch.Tensor, root: torch.Tensor) -> None:
    """The drafter's first step through PyTorch: the root's embedding, the RNN cell, the head, softmax, top-1."""
    state = drafter.rnn_step(None, drafter.embed(root))
    drafter.head(drafter.condition(hidden), state).float().softmax(-1).max(-1)


def main() -> None:
    rd = ReDrafter.from_pretrained(weights="float")
    time_step(rd)
    for path in sys.argv[1:]:
        records = [json.loads(line) for line in open(path)]
        guesses = [drafter_guesses(rd, record) for record in records]
        for with_guess in (False, True):
            calibration = [0.0, 0, 0]
            runs = [replay(rd, r, g, with_guess, calibration) for r, g in zip(records, guesses, strict=True)]
            tokens, steps, nodes = (sum(run[k] for run in runs) for k in range(3))
            estimates = [tokens / sum(run[3][i] for run in runs) for i in range(len(DRAFTER_COSTS))]
            print(
                f"{Path(path).name}, drafter's guess {'in' if with_guess else 'out'}: {tokens / steps:.3f} tokens "
                f"a step, {nodes / steps:.2f} nodes, estimated "
                + ", ".join(f"{e:.3f}x (drafter {c})" for e, c in zip(estimates, DRAFTER_COSTS, strict=True))
            )
            if with_guess:
                print(
                    f"    its guesses: probability {calibration[0] / calibration[2]:.3f} on average, "
                    f"right {calibration[1] / calibration[2]:.3f} of the time"
                )


if __name__ == "__main__":
    main()
