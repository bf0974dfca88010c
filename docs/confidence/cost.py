"""Milliseconds of a decode step's forward and certified argmax for n tree tokens after C cached ones (the
default model, w4a8), the sizes interleaved, medians of the rounds after the first two (10 calls each):

    for c in 100 400 1000; do python docs/confidence/cost.py 1,2,3,4,5,6,7,8,10 $c 22; done > docs/confidence/cost.txt
"""

import statistics
import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.sampling import exact_argmax
from redrafter.tree import additive_mask

rd = ReDrafter.from_pretrained()
target = rd.target
forward = target_forward(target)
sizes = [int(x) for x in sys.argv[1].split(",")]
ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 300
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, 49152, (1, ctx + max(sizes)), generator=g)
cache = TreeKVCache(target.config.num_hidden_layers, capacity=ctx + max(sizes))
with torch.inference_mode():
    forward(
        prompt[:, :ctx],
        torch.arange(ctx)[None],
        additive_mask(torch.ones(1, ctx, ctx, dtype=torch.bool).tril(), torch.bfloat16),
        cache,
    )
    times = {n: [] for n in sizes}
    for rep in range(int(sys.argv[3]) if len(sys.argv) > 3 else 12):
        for n in sizes:
            mask = torch.zeros(1, 1, n, ctx + n, dtype=torch.bfloat16)
            s = time.perf_counter()
            for _ in range(10):
                h = forward(prompt[:, ctx : ctx + n], torch.arange(ctx, ctx + n)[None], mask, cache)
                exact_argmax(target, h, argmax_head=rd.decoder.argmax_head)
                cache.crop(-n)
            if rep >= 2:
                times[n].append((time.perf_counter() - s) * 100)
print(ctx, {n: round(statistics.median(v), 2) for n, v in times.items()})
