"""Where `ar`'s 128-token answer first differs between the fused and the unfused w4a8 prefill, and the
target's top-2 logit gap there (recomputed by a full forward over the prompt and the common prefix), for
the first 12 of 26 Spec-Bench prompts (2 a category).

    python docs/fused-prefill/first_difference.py
"""

import torch

from redrafter import lean_decoder
from redrafter.api import ReDrafter
from redrafter.bench import plain_engine
from redrafter.prompts import per_category, read_prompts

rd = ReDrafter.from_pretrained("default")
ar = plain_engine(rd)
W = rd.target.get_output_embeddings().weight.float()
prompts = per_category(read_prompts("../shared/data/spec_bench.jsonl"), 2)
for p in prompts[:12]:
    ids = rd.encode(p.text)
    lean_decoder.FUSED_PREFILL_MAX_TOKENS = 1024
    a = ar.generate_ids([ids], 128)[0].token_ids
    lean_decoder.FUSED_PREFILL_MAX_TOKENS = 0
    b = ar.generate_ids([ids], 128)[0].token_ids
    if a == b:
        print(p.category, "same")
        continue
    j = next(j for j in range(min(len(a), len(b))) if a[j] != b[j])
    with torch.inference_mode():
        h = rd.target.model(input_ids=torch.tensor([ids + a[:j]])).last_hidden_state[0, -1].float()
        top = (W @ h).topk(2)
    print(
        p.category,
        "first difference at",
        j,
        "tokens",
        a[j],
        b[j],
        "top-2 gap there",
        round(float(top.values[0] - top.values[1]), 4),
        "top2",
        top.indices.tolist(),
    )
