"""One target forward after 256 cached tokens, through transformers' decoder and the lean forward,
interleaved (medians of 25): `python docs/lean/forward_time.py int4` (or float, int8)."""

import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward, transformers_forward
from redrafter.tree import additive_mask

torch.set_num_threads(2)
rd = ReDrafter.from_pretrained(drafter=None, weights=sys.argv[1] if len(sys.argv) > 1 else "int4")
target, config = rd.target, rd.target.config
forwards = {"transformers": transformers_forward(target), "lean": target_forward(target)}
prompt = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
causal = additive_mask(torch.ones(256, 256, dtype=torch.bool).tril()[None], target.dtype)
with torch.inference_mode():
    caches = {name: TreeKVCache(config.num_hidden_layers, 1024) for name in forwards}
    for name, forward in forwards.items():
        forward(prompt, torch.arange(256)[None], causal, caches[name])
    for q in (1, 4, 12):
        tokens, positions = torch.randint(0, 1000, (1, q)), torch.arange(256, 256 + q)[None]
        mask = torch.zeros(1, 1, q, 256 + q, dtype=target.dtype)
        times = {name: [] for name in forwards}
        for _ in range(25):
            for name, forward in forwards.items():
                start = time.perf_counter()
                forward(tokens, positions, mask, caches[name])
                times[name].append(1000 * (time.perf_counter() - start))
                caches[name].crop(-q)
        print(q, {name: round(sorted(t)[12], 2) for name, t in times.items()})
