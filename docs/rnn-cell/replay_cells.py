"""Replayed tokens/step along ar's greedy text: the shipped drafter with its own cell and with TensorRT-LLM's."""
import copy
import json
import sys

from redrafter.api import ReDrafter
from redrafter.prompts import per_category, read_prompts

prompts = per_category(read_prompts("../shared/data/mt_bench.jsonl"), int(sys.argv[1]))
rd = ReDrafter.from_pretrained("default")
ar = ReDrafter(rd.target, rd.tokenizer, None)
trt = copy.deepcopy(rd.drafter)
trt.config.rnn_cell = "trtllm"
engines = {
    "reference cell (as trained)": rd,
    "trtllm cell, same weights": ReDrafter(rd.target, rd.tokenizer, trt, rd.num_beams, rd.draft_len, rd.lookup_len, rd.ngram_len, rd.tree_nodes),
}
for name, engine in list(engines.items()):
    engines[name + ", drafter beams only"] = ReDrafter(
        rd.target, rd.tokenizer, engine.drafter, rd.num_beams, rd.draft_len, 0, 0, rd.tree_nodes
    )
tokens, steps = 0, {name: 0 for name in engines}
for prompt in prompts:
    ids = rd.encode(prompt.text)
    output = ar.generate_ids([ids], 256)[0].token_ids
    tokens += len(output)
    for name, engine in engines.items():
        steps[name] += len(engine.decoder.replay(ids, output))
print(json.dumps({"prompts": len(prompts), "tokens": tokens, "replayed_tokens_per_step": {n: round(tokens / s, 3) for n, s in steps.items()}}, indent=1))
