"""A 4-bit copy of the head (Q4_1-style, re-quantized from the file's Q8_0 values) as the argmax's
screen, top-8 candidates recomputed in float32, against the Q8_0 screen: `ar` and `redrafter`,
interleaved per prompt (2 Spec-Bench prompts a category, 128 tokens), and where an output changed,
why. Written against the top-8 candidates of Session 31 (`W4A8Linear.top`, since replaced by the
certified argmax): run it on commit 3f26218.

    python docs/certified-argmax/four_bit_screen.py
"""

import torch

from redrafter.api import ReDrafter
from redrafter.bench import plain_engine
from redrafter.prompts import per_category, read_prompts
from redrafter.quant import quantize_int4, w4a8_linear

rd = ReDrafter.from_pretrained("default")
ar = plain_engine(rd)
head = rd.decoder.argmax_head
q8 = head.linear
W = rd.target.get_output_embeddings().weight.detach()
q4 = w4a8_linear(quantize_int4(W.float()), None, W.dtype)
prompts = per_category(read_prompts("../shared/data/spec_bench.jsonl"), 2)
tot = {k: [0.0, 0] for k in ["ar q8", "ar q4", "rd q8", "rd q4"]}
same = 0
for i, p in enumerate(prompts):
    ids = rd.encode(p.text)
    outs = {}
    order = [("q8", q8), ("q4", q4)] if i % 2 == 0 else [("q4", q4), ("q8", q8)]
    for name, lin in order:
        head.linear = lin
        for eng_name, eng in [("ar", ar), ("rd", rd)]:
            g = eng.generate_ids([ids], 128)[0]
            tot[f"{eng_name} {name}"][0] += g.seconds
            tot[f"{eng_name} {name}"][1] += g.new_tokens
            outs[(eng_name, name)] = g.token_ids
    if len({tuple(v) for v in outs.values()}) != 1:
        print("prompt", i, p.category, {k: len(v) for k, v in outs.items()})
        a, b = outs[("ar", "q8")], outs[("ar", "q4")]
        j = next(j for j in range(min(len(a), len(b))) if a[j] != b[j]) if a != b else None
        print(
            "ar q8 vs q4 first difference",
            j,
            "rd q8==ar q8",
            outs[("rd", "q8")] == a,
            "rd q4==ar q4",
            outs[("rd", "q4")] == b,
        )
        if j is not None:
            full = torch.tensor([ids + a[:j]])
            with torch.inference_mode():
                h = rd.target.model(input_ids=full).last_hidden_state[0, -1:]
                exact = (h.float() @ W.float().T)[0]
                top = exact.topk(5)
                print("exact top5", top.indices.tolist(), [round(v, 4) for v in top.values.tolist()])
                print("q8 cands", q8.top(h, 8).tolist(), "q4 cands", q4.top(h, 8).tolist(), "a[j], b[j]", a[j], b[j])
    same += len({tuple(v) for v in outs.values()}) == 1
for k, (s, n) in tot.items():
    print(f"{k}: {n / s:.1f} tokens/s")
print(f"all four outputs equal on {same}/{len(prompts)} prompts")
