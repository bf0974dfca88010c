"""Milliseconds per w4a8 prefill of the default model by prompt length: the unfused layers with SDPA
(before), the fused layers in one C call (now, up to FUSED_PREFILL_MAX_TOKENS), and the unfused layers
with decode steps' attention, whose arithmetic the fused prefill has (best of 3, interleaved).

    python docs/fused-prefill/prefill_cost.py
"""

import json
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

rows = [json.loads(line) for line in open("../shared/data/spec_bench.jsonl")]
with torch.inference_mode():
    target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
    quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
    lean = target_forward(target)
    text = " ".join(row["turns"][0] for row in rows[400:440])  # RAG prompts: long passages
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    layers, kv_heads, head_dim = len(lean.layers), lean.kv_heads, lean.head_dim
    for n in (16, 64, 200, 700, 1200, 2400):
        ids, positions = torch.tensor([tokens[:n]]), torch.arange(n)[None]
        mask = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
        lean.make_tables(n, ids.device)

        def unfused(ids=ids, positions=positions, mask=mask, invariant: bool = False) -> TreeKVCache:
            cache = TreeKVCache(layers, capacity=ids.shape[1] + 64)
            lean.run(ids, positions, mask, cache, invariant=invariant)
            return cache

        def fused(ids=ids, positions=positions, mask=mask) -> TreeKVCache:
            cache = TreeKVCache(layers, capacity=ids.shape[1] + 64)
            cache.allocate(1, kv_heads, head_dim, torch.bfloat16, ids.device)
            lean.run_fused(ids, positions, mask, cache)
            return cache

        runs = {"SDPA": unfused, "fused": fused, "decode attention": lambda unfused=unfused: unfused(invariant=True)}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(3):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        a, b = fused(), unfused(invariant=True)
        equal = all(torch.equal(x.keys[:, :, :n], y.keys[:, :, :n]) for x, y in zip(a.layers, b.layers, strict=True))
        print(
            f"{n:5d} tokens: "
            + ", ".join(f"{name} {1e3 * seconds:7.1f} ms" for name, seconds in best.items())
            + f"; fused keys equal to decode attention's: {equal}",
            flush=True,
        )
