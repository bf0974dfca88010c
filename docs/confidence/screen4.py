"""The certified argmax through a 4-bit screen of the head (min-max per 32, as Q4_1) against the file's Q8_0
screen: the same ids, how many logits each computes exactly, and the time (1 and 5 rows), on the target's
hidden states along 20 greedy outputs of dump.py.

    python docs/confidence/screen4.py mt80.jsonl
"""

import json
import statistics
import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.quant import W4A8_ARGMAX_HEAD_MAX_ROWS, ArgmaxHead, quantize_int4
from redrafter.w4a8 import W4A8Linear, argmax_bounds

torch.manual_seed(0)
rd = ReDrafter.from_pretrained()
q8 = rd.decoder.argmax_head
exact = q8.exact
w = quantize_int4(exact)
lin = W4A8Linear(w.codes, w.scale, w.minimum, 4, None, exact.dtype)
d, m = w.scale.half().double(), w.minimum.half().double()
bounds = torch.cat(
    [
        argmax_bounds(
            exact[i : i + 4096],
            (
                w.codes[i : i + 4096].double().unflatten(1, (-1, 32)) * d[i : i + 4096, :, None]
                + m[i : i + 4096, :, None]
            ).flatten(1),
        )
        for i in range(0, exact.shape[0], 4096)
    ],
    1,
)
q4 = ArgmaxHead(lin, False, W4A8_ARGMAX_HEAD_MAX_ROWS, exact, bounds)
rows = [json.loads(line) for line in open(sys.argv[1])][:20]
hs = []
with torch.inference_mode():
    for r in rows:
        seq = torch.tensor([r["prompt"] + r["answer"]])
        out = rd.target.model(input_ids=seq)
        hs.append(out.last_hidden_state[0, len(r["prompt"]) - 1 :])
    H = torch.cat(hs)  # [P, d]
    print("positions", H.shape)
    for name, head in (("q8", q8), ("q4", q4)):
        ids, checked = head.linear.argmax(H, head.exact, head.bounds)
        print(
            name,
            "checked mean",
            checked.float().mean().item(),
            "p99",
            checked.float().quantile(0.99).item(),
            "max",
            checked.max().item(),
        )
        if name == "q8":
            ref = ids
        else:
            print("same ids:", torch.equal(ids, ref))
    for n in (1, 5):
        t = {"q8": [], "q4": []}
        for _ in range(5):
            for name, head in (("q8", q8), ("q4", q4)):
                s = time.perf_counter()
                for i in range(0, 400, n):
                    head.argmax(H[i : i + n])
                t[name].append((time.perf_counter() - s) / (400 // n) * 1e3)
        print(n, "rows ms:", {k: round(statistics.median(v), 3) for k, v in t.items()})
