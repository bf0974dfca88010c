"""The shipped drafter's top-1 per draft step, teacher-forced along greedy outputs of dump.py, fed the hidden
states of the w4a8 target or of the bfloat16 one:

    python docs/confidence/shift.py mt80.jsonl 40
"""

import json
import sys

import torch

from redrafter.api import ReDrafter
from redrafter.train import draft_targets

recs = [json.loads(line) for line in open(sys.argv[1])][: int(sys.argv[2])]
res = {}
for weights in ("w4a8", "float"):
    rd = ReDrafter.from_pretrained(weights=weights, drafter_weights="float")
    dr = rd.drafter.float()
    correct = torch.zeros(4)
    counted = torch.zeros(4)
    with torch.inference_mode():
        for r in recs:
            ids = torch.tensor([r["prompt"] + r["answer"]])
            h = rd.target.model(input_ids=ids).last_hidden_state.float()
            att = torch.ones_like(ids)
            inputs, labels, valid = draft_targets(ids, att, torch.tensor([len(r["prompt"])]), 4)
            logits = dr(h, inputs)
            pred = dr.to_target_ids(logits.argmax(-1))
            correct += ((pred == labels) & valid).sum((0, 1))
            counted += valid.sum((0, 1))
    res[weights] = (correct / counted).tolist()
    print(weights, [round(x, 3) for x in res[weights]], int(counted[0]), flush=True)
