"""The greedy argmax's candidates from the default model's Q8_0 head (w4a8): the head's logits then
``topk`` (before Session 31), against the candidates picked inside the head's own call
(``ArgmaxHead.candidates``), for 1 to 32 rows; best of three timings of 300 calls each, and how often
the two give the same 8 candidates (they differ where bfloat16 rounding ties the 8th and 9th).
Written for Session 31's in-call candidates (``W4A8Linear.top``); Session 32 replaced them with the
certified argmax (``docs/certified-argmax/``), and ``ArgmaxHead.candidates`` now takes ``topk`` of the
logits, so run this on commit 3f26218 to compare the two.

    python docs/host-steps/head_candidates.py
"""

import time

import torch

from redrafter.api import ReDrafter

rd = ReDrafter.from_pretrained("default", drafter="none")
head = rd.argmax_head


def timed(function, calls: int = 300) -> float:
    for _ in range(10):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


with torch.inference_mode():
    for rows in (1, 4, 8, 16, 32):
        hidden = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)

        def separate(hidden=hidden):
            return head(hidden).topk(8, dim=-1).indices

        def inside(hidden=hidden):
            return head.candidates(hidden, 8)

        before = min(timed(separate) for _ in range(3))
        after = min(timed(inside) for _ in range(3))
        same = (separate().sort().values == inside().sort().values).all(dim=-1).float().mean()
        print(f"rows {rows:3d}: head, topk {before:6.0f} us; in its call {after:6.0f} us; same {same:.2f}")
