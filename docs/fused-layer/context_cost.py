"""Milliseconds per fused w4a8 forward of 1 and 6 tokens after contexts of 100 to 2,000 tokens (the first
Spec-Bench prompts' text, cut): what attention over a long context adds to a step.

    python docs/fused-layer/context_cost.py
"""

import json
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

TEXT = " ".join(json.loads(line)["turns"][0] for line in list(open("../shared/data/spec_bench.jsonl"))[:200])

with torch.inference_mode():
    target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
    quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
    forward = target_forward(target)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    for n in (100, 500, 1000, 2000):
        cache = TreeKVCache(target.config.num_hidden_layers, capacity=n + 64)
        causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
        forward(torch.tensor([ids[:n]]), torch.arange(n)[None], causal, cache)
        for rows in (1, 6):
            tree = torch.ones(rows, rows, dtype=torch.bool).tril()
            seen = torch.cat([torch.ones(rows, n, dtype=torch.bool), tree], 1)
            mask = additive_mask(seen[None], torch.bfloat16)
            tokens, positions = torch.arange(rows)[None] + 100, torch.arange(n, n + rows)[None]
            for repeat in range(13):
                if repeat == 3:
                    start = time.perf_counter()
                cache.crop(n - cache.length)
                forward(tokens, positions, mask, cache)
            print(f"context {n} tokens {rows}: {(time.perf_counter() - start) / 10 * 1e3:.2f} ms", flush=True)
