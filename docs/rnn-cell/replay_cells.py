"""Replayed tokens/step along ar's greedy text (SpeculativeDecoder.replay): the shipped drafter with its
own RNN cell and with TensorRT-LLM's, and any drafter folders given as NAME=FOLDER.

python docs/rnn-cell/replay_cells.py PROMPTS_PER_CATEGORY [NAME=FOLDER ...]
"""

import copy
import json
import sys

from redrafter.api import ReDrafter
from redrafter.drafter import RecurrentDrafter
from redrafter.prompts import per_category, read_prompts

prompts = per_category(read_prompts("../shared/data/mt_bench.jsonl"), int(sys.argv[1]))
rd = ReDrafter.from_pretrained("default")
ar = ReDrafter(rd.target, rd.tokenizer, None)
trtllm = copy.deepcopy(rd.drafter)
trtllm.config.rnn_cell = "trtllm"
drafters = {"reference cell (as trained)": rd.drafter, "trtllm cell, same weights": trtllm}
for item in sys.argv[2:]:
    name, folder = item.split("=", 1)
    drafters[name] = RecurrentDrafter.from_pretrained(folder)
    drafters[name].ngrams = drafters[name].ngrams or rd.drafter.ngrams  # the corpus table does not depend on the cell
engines = {}
for name, drafter in drafters.items():
    shape = dict(num_beams=rd.num_beams, draft_len=rd.draft_len, tree_nodes=rd.tree_nodes)
    engines[name] = ReDrafter(rd.target, rd.tokenizer, drafter, **shape, lookup_len=rd.lookup_len, ngram_len=4)
    engines[name + ", drafter beams only"] = ReDrafter(rd.target, rd.tokenizer, drafter, **shape, lookup_len=0, ngram_len=0)
tokens, steps = 0, dict.fromkeys(engines, 0)
for prompt in prompts:
    ids = rd.encode(prompt.text)
    output = ar.generate_ids([ids], 256)[0].token_ids
    tokens += len(output)
    for name, engine in engines.items():
        steps[name] += len(engine.decoder.replay(ids, output))
result = {"prompts": len(prompts), "tokens": tokens}
result["replayed_tokens_per_step"] = {n: round(tokens / s, 3) for n, s in steps.items()}
print(json.dumps(result, indent=1))
