"""Held-out teacher-forced top-1 per draft step and simulated tokens per step of drafters, split by
kind of conversation, on the held-out split of the GPU fine-tunes (every 25th conversation of the
corpus folders in the order run.sh gave them to `redrafter train`): none of the fine-tunes trained on
these. The long-input ones are fair to the shipped drafter too (it saw no inputs folder); the chat
ones flatter it (its stage 2 held out every 25th conversation of another order of the chat folders,
so it trained on most of these; chat: every 8th held-out chat conversation). `chat_unseen`: the
held-out chat conversations that the shipped drafter's split held out too, fair to all.

python docs/inputs-gpu/evaluate.py OUT.json DRAFTER... [--only SUBSET...]   (hidden states: build/hidden-s26)
"""

import argparse
import json
import sys

import numpy as np

from redrafter.api import resolve_drafter
from redrafter.distill import Corpus
from redrafter.hidden_cache import HiddenStates
from redrafter.models import load_target
from redrafter.train import TrainConfig, evaluate_drafter, load_corpora, split_heldout

C = "data/corpus/smollm2-135m-instruct"
FOLDERS = (  # `ls -d` order on the GPU machine, as run.sh passed them
    [C]
    + [f"{C}-gpu-seed{s}" for s in (5, 6, 7, 8)]
    + [f"{C}-inputs-gpu-seed{s}" for s in (24, 28)]
    + [f"{C}-inputs-seed{s}" for s in (20, 21, 22)]
    + [f"{C}-openers-seed{s}" for s in (10, 11, 12)]
    + [f"{C}-seed{s}" for s in (1, 2, 3, 4, 9)]
)
parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("drafters", nargs="+")
parser.add_argument("--only", nargs="+", default=["long_inputs", "chat", "chat_unseen"])
args = parser.parse_args()
out_path, names, only = args.out, args.drafters, args.only
pairs = load_corpora(FOLDERS)  # duplicate prompts across folders dropped, as train does
kind, seen = [], set()
for folder in FOLDERS:
    for prompt, _ in Corpus(folder).conversations():
        if tuple(prompt) not in seen:
            seen.add(tuple(prompt))
            kind.append("long_inputs" if "inputs" in folder else "chat")
assert len(kind) == len(pairs)
_, heldout = split_heldout(len(pairs), 25)
long_inputs = [i for i in heldout if kind[i] == "long_inputs"]
chat = [i for i in heldout if kind[i] == "chat"][::8]
# Chat held out from the shipped drafter too: its stage-2 split, every 25th of the Makefile's order.
SHIPPED_ORDER = (
    [C] + [f"{C}-seed{s}" for s in (1, 2, 3, 4)] + [f"{C}-gpu-seed{s}" for s in (5, 6, 7, 8)] + [f"{C}-seed9"]
)
SHIPPED_ORDER += [f"{C}-openers-seed{s}" for s in (10, 11, 12)]
shipped_pairs = load_corpora(SHIPPED_ORDER)
unseen = {tuple(shipped_pairs[i][0]) for i in split_heldout(len(shipped_pairs), 25)[1]}
chat_unseen = [i for i in heldout if kind[i] == "chat" and tuple(pairs[i][0]) in unseen]
chosen = long_inputs + chat + chat_unseen  # in this order: the cache of an earlier run is a prefix
target, _ = load_target("default")
features = HiddenStates("build/hidden-s26", [pairs[i] for i in chosen], target, progress=True)
bounds = np.cumsum([0, len(long_inputs), len(chat), len(chat_unseen)])
subsets = {
    name: list(range(bounds[k], bounds[k + 1]))
    for k, name in enumerate(["long_inputs", "chat", "chat_unseen"])
    if name in only
}
results = {"conversations": {k: len(v) for k, v in subsets.items()}, "drafters": {}}
config = TrainConfig(batch_size=8, eval_positions=1024)
for name in names:
    drafter = resolve_drafter(name, "default").float()
    drafter.attach(target.get_input_embeddings(), target.get_output_embeddings())
    results["drafters"][name] = {}
    for subset, indices in subsets.items():

        def states(batch, ids, attention, indices=indices):
            return features.batch([indices[i] for i in batch])

        conversations = [pairs[chosen[i]] for i in indices]
        results["drafters"][name][subset] = evaluate_drafter(drafter, conversations, states, config)
        print(name, subset, json.dumps(results["drafters"][name][subset]), file=sys.stderr, flush=True)
with open(out_path, "w") as handle:
    json.dump(results, handle, indent=1)
