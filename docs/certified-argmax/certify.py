"""The w4a8 greedy argmax, certified: checked against the bfloat16 head's float32 argmax on hidden
states of real decoding, with how many logits each row computed exactly; and the 4-bit head copy that
was tried first, whose bound admits most of the vocabulary.

    python docs/certified-argmax/certify.py   # about 3 minutes on 2 cores
"""

import torch

from redrafter.api import ReDrafter
from redrafter.head import BFloat16Head
from redrafter.prompts import per_category, read_prompts
from redrafter.quant import quantize_int4
from redrafter.w4a8 import argmax_bounds

rd = ReDrafter.from_pretrained("default", drafter="none")
head = rd.argmax_head
weight = rd.target.get_output_embeddings().weight
prompts = per_category(read_prompts("../shared/data/spec_bench.jsonl"), 3)  # 39 prompts, 3 a category
states = []
with torch.inference_mode():
    for prompt in prompts:
        ids = rd.encode(prompt.text)
        answer = rd.generate_ids([ids], max_new_tokens=64)[0].token_ids
        states.append(rd.target.model(input_ids=torch.tensor([ids + answer])).last_hidden_state[0, -80:])
    hidden = torch.cat(states)  # the last 80 positions of each prompt and its answer
    ids, checked = head.linear.argmax(hidden, head.exact, head.bounds)
    truth = BFloat16Head(weight)(hidden.float()).argmax(dim=-1)
    counts = checked.double()
    print(f"{len(hidden)} hidden states of {len(prompts)} Spec-Bench prompts and their greedy answers")
    print(f"certified argmax equal to the bfloat16 head's float32 argmax: {int((ids == truth).sum())} of {len(ids)}")
    print(
        "logits computed exactly per row: "
        + ", ".join(f"p{q} {counts.quantile(q / 100).item():.0f}" for q in (50, 90, 99))
        + f", max {counts.max().item():.0f} (of {weight.shape[0]})"
    )
    screen_top8 = head(hidden).float().topk(8, dim=-1).indices
    missed = int((screen_top8 != truth[:, None]).all(-1).sum())
    print(f"rows whose best is outside the screen's 8 largest logits: {missed}")

    # A 4-bit copy of the head (Q4_1-style, re-quantized from the file's values): half the bytes.
    four_bit = quantize_int4(weight.float())
    screen = four_bit.dequantize().double()  # float32 d q + zero: what quantize_int4 gives, to its rounding
    gap, norm = argmax_bounds(weight, screen)
    h = hidden.double()
    blocks = h.view(len(h), -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    dequantized = (torch.round(blocks / torch.where(scale > 0, scale, 1)) * scale).view(len(h), -1)
    logits = dequantized @ screen.T
    bound = gap[None] * h.norm(dim=-1, keepdim=True) + norm[None] * (h - dequantized).norm(dim=-1, keepdim=True)
    low = (logits - bound).max(dim=-1, keepdim=True).values
    admitted = (logits + bound >= low).sum(-1).double()
    error = (logits - h @ weight.double().T).abs().max().item()
    missed = int((logits.topk(8, dim=-1).indices != truth[:, None]).all(-1).sum())
    print(
        f"4-bit copy: largest logit error {error:.2f}; its bound admits p50 {admitted.median().item():.0f} "
        f"of {weight.shape[0]} logits a row; best outside its 8 largest: {missed} rows"
    )
