"""A w4a8 decode step of the default model through the fused layers (redrafter.fused_layer) and through
the unfused lean forward: the largest difference of the final hidden states and of layer 5's new keys, and
each path's milliseconds per forward.

    python docs/fused-layer/fused_vs_unfused.py

The first Spec-Bench prompt is prefilled; then chains of 1, 4 and 16 random tokens run after it, once
per path, from the same cache. Timed: 40 one-token forwards, 20 forwards of 8-token chains.
"""

import json
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

PROMPT = json.loads(open("../shared/data/spec_bench.jsonl").readline())["turns"][0]


def chain(forward, cache: TreeKVCache, start: int, tokens: torch.Tensor) -> torch.Tensor:
    rows = tokens.shape[0]
    seen = torch.cat([torch.ones(rows, start, dtype=torch.bool), torch.ones(rows, rows, dtype=torch.bool).tril()], 1)
    mask = additive_mask(seen[None], torch.bfloat16)
    return forward(tokens[None], torch.arange(start, start + rows)[None], mask, cache)


with torch.inference_mode():
    target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
    quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
    forward = target_forward(target)
    lean = getattr(forward, "lean", forward)
    fused = lean.fused
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]
    cache = TreeKVCache(target.config.num_hidden_layers, capacity=n + 400)
    causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
    forward(ids, torch.arange(n)[None], causal, cache)
    for rows in (1, 4, 16):
        tokens = torch.randint(0, 49152, (rows,), generator=torch.Generator().manual_seed(rows))
        out = {}
        for path in ("fused", "unfused"):
            lean.fused = fused if path == "fused" else None
            cache.crop(n - cache.length)
            out[path] = chain(forward, cache, n, tokens), cache.layers[5].keys[:, :, n : n + rows].clone()
        hidden = (out["fused"][0].float() - out["unfused"][0].float()).abs().max().item()
        keys = (out["fused"][1].float() - out["unfused"][1].float()).abs().max().item()
        print(f"{rows:2d} tokens: largest difference, hidden states {hidden}, keys {keys}")
    for path in ("fused", "unfused"):
        lean.fused = fused if path == "fused" else None
        cache.crop(n - cache.length)
        for i in range(45):
            if i == 5:
                start = time.perf_counter()
            chain(forward, cache, n + i, torch.tensor([5]))
        one = (time.perf_counter() - start) / 40 * 1e3
        cache.crop(n - cache.length)
        start = time.perf_counter()
        for i in range(20):
            chain(forward, cache, n + 8 * i, torch.arange(8))
        eight = (time.perf_counter() - start) / 20 * 1e3
        print(f"{path}: {one:.2f} ms a one-token forward, {eight:.2f} ms an 8-token one")
