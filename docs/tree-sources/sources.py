"""Per tree step: its nodes, and how many tokens each beam source alone would have accepted.

Usage: python docs/tree-sources/sources.py ../shared/data/spec_bench.jsonl 2 OUT.json
(the first 2 prompts of each category, 128 new tokens, greedy, bfloat16, the default tree, the
float drafter). Sources: the drafter's dynamic tree (its T prefixes), the context-lookup beam, the
n-gram beam; "total" is what the step emitted (accepted + 1).
"""

import collections
import json
import sys

import redrafter.decode as decode
from redrafter.api import ReDrafter
from redrafter.prompts import per_category, read_prompts

rd = ReDrafter.from_pretrained("default", drafter_weights="float")
proposer = rd.decoder.proposer
drafted = min(proposer.tree_nodes, proposer.num_beams * (proposer.draft_len - 1)) or proposer.num_beams
steps: list[dict] = []
verify = decode.verify


def recording_verify(beams, node_index, choice):
    verdict = verify(beams, node_index, choice)
    batch, width, length = beams.shape
    predicted = choice.gather(1, node_index.reshape(batch, -1)).reshape(batch, width, length)
    accepted = (beams[:, :, 1:] == predicted[:, :, :-1]).long().cumprod(-1).sum(-1)[0]
    steps.append(
        {
            "nodes": int(node_index.max()) + 1,
            "drafter": int(accepted[:drafted].max()),
            "lookup": int(accepted[drafted]),
            "ngram": int(accepted[drafted + 1]) if width > drafted + 1 else 0,
            "lookup_len": int((beams[0, drafted] >= 0).sum()) - 1,
            "total": int(verdict.num_tokens[0]),
        }
    )
    return verdict


decode.verify = recording_verify
by_category = collections.defaultdict(list)
for prompt in per_category(read_prompts(sys.argv[1]), int(sys.argv[2])):
    steps.clear()
    rd.generate(prompt.text, max_new_tokens=128)
    by_category[prompt.category].extend(steps)
with open(sys.argv[3], "w") as out:
    json.dump(by_category, out)
