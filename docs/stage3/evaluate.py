"""Held-out teacher-forced top-1 per draft step and simulated tokens per step of drafters, split by
kind of conversation: the held-out conversations (every 25th) of the long-given-input folders and of
the chat folder that the stage-3 fine-tune trained on (none of the drafters compared trained on them;
the shipped drafter saw neither the inputs folders nor these held-out chats, held out in its stage 2 too).

python docs/stage3/evaluate.py OUT.json DRAFTER...   (reads the hidden-state cache of the fine-tune)
"""

import json
import sys

from redrafter.api import resolve_drafter
from redrafter.hidden_cache import HiddenStates
from redrafter.models import load_target
from redrafter.train import TrainConfig, evaluate_drafter, load_corpora, split_heldout

C = "data/corpus/smollm2-135m-instruct"
INPUTS = [f"{C}-inputs-seed20", f"{C}-inputs-seed21", f"{C}-inputs-seed22"]
CHAT = [f"{C}-openers-seed10"]
out_path, names = sys.argv[1], sys.argv[2:]
pairs = load_corpora(INPUTS + CHAT)
boundary = len(load_corpora(INPUTS))
target, _ = load_target("default")
features = HiddenStates("build/hidden-stage3", pairs, target, progress=False)
_, heldout = split_heldout(len(pairs), 25)
subsets = {"long_inputs": [i for i in heldout if i < boundary], "chat": [i for i in heldout if i >= boundary]}
results = {"conversations": {k: len(v) for k, v in subsets.items()}, "drafters": {}}
config = TrainConfig(batch_size=8, eval_positions=1024)
for name in names:
    drafter = resolve_drafter(name, "default").float()
    drafter.attach(target.get_input_embeddings(), target.get_output_embeddings())
    results["drafters"][name] = {}
    for subset, indices in subsets.items():

        def states(batch, ids, attention, indices=indices):
            return features.batch([indices[i] for i in batch])

        conversations = [pairs[i] for i in indices]
        results["drafters"][name][subset] = evaluate_drafter(drafter, conversations, states, config)
        print(name, subset, json.dumps(results["drafters"][name][subset]), file=sys.stderr, flush=True)
with open(out_path, "w") as handle:
    json.dump(results, handle, indent=1)
