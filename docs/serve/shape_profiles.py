"""Per output position: what a tree step and a small-tree step would emit there (teacher-forced).

Usage: python docs/serve/shape_profiles.py PROMPTS.jsonl PER_CATEGORY OUT.json [MAX_NEW_TOKENS]

For each prompt (the first PER_CATEGORY of each category) the greedy output is generated once
(bfloat16, the default tree); then at every position p of it the tree of the default shape is drafted
from the target's hidden states along prompt + output (as :meth:`SpeculativeDecoder.replay` does)
and verified against the output: ``tree[p]`` is what a tree step taken at p emits, ``small[p]`` what
the small tree would (2 when the output's token at p is one of its depth-1 tokens, else 1). A
policy can then be replayed on these profiles (``shape_sim.py``), whatever steps it takes.

The lookup beam is drafted at its base length at every position: a row copying a long span doubles
it in :meth:`decode`, which a position-by-position replay does not follow, so ``tree`` is a little
low inside long copies (where the tree wins anyway).
"""

import json
import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.decode import UNKNOWN
from redrafter.models import decoder_features
from redrafter.prompts import per_category, read_prompts
from redrafter.tree import build_tree
from redrafter.verify import verify

path, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
max_new = int(sys.argv[4]) if len(sys.argv) > 4 else 128
rd = ReDrafter.from_pretrained("default", small_tree=True)
d = rd.decoder
small = d.trees[1]
records = []
started = time.time()
for prompt in per_category(read_prompts(path), count):
    ids = rd.encode(prompt.text)
    output = rd.generate_ids([ids], max_new_tokens=max_new)[0].token_ids
    with torch.inference_mode():
        sequence = torch.tensor([ids + output])
        hidden = decoder_features(d.decoder, d.layers, input_ids=sequence, use_cache=False)[0]
        truth = torch.tensor(output + [UNKNOWN])
        lookup = d._lookup([ids])
        tree_counts, small_counts = [], []
        for done in range(1, len(output)):
            lookup.extend(0, output[done - 1 : done])
            lookup.lengths[0] = lookup.length  # base length (see the docstring)
            position = len(ids) + done - 1
            beams = d.proposer(hidden[position - 1][None], sequence[:, position], torch.tensor([position]))
            beams = lookup.beams(beams)
            tree = build_tree(beams)
            choice = truth[(done + tree.depth).clamp(max=len(output))]
            tree_counts.append(min(int(verify(beams, tree.node_index, choice).num_tokens[0]), len(output) - done))
            small = int(d._small_tree_counts(beams, truth[done : done + 1][None], lookup)[0])
            small_counts.append(min(small, len(output) - done))
    records.append({"category": prompt.category, "tree": tree_counts, "small": small_counts})
    print(
        f"{len(records)} {prompt.category}: {len(output)} tokens, tree {sum(tree_counts) / len(tree_counts):.2f}, "
        f"small {sum(small_counts) / len(small_counts):.2f} per position ({time.time() - started:.0f} s)",
        flush=True,
    )
with open(out, "w") as f:
    json.dump({"prompts": path, "per_category": count, "max_new_tokens": max_new, "records": records}, f)
