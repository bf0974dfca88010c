"""Milliseconds per w4a8 forward (fused layers) and per exact argmax (the Q8_0 quick head) at 1 to 16
tokens, after the first Spec-Bench prompt (20 of each, after 3 to warm up):

    python docs/fused-layer/rows_cost.py
"""

import json
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import gguf_argmax_head, quantize_target
from redrafter.sampling import exact_argmax
from redrafter.tree import additive_mask

PROMPT = json.loads(open("../shared/data/spec_bench.jsonl").readline())["turns"][0]


def milliseconds(run, repeats: int = 20) -> float:
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1e3


with torch.inference_mode():
    target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
    quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
    head = gguf_argmax_head(target, gguf_source("default"), "w4a8")
    forward = target_forward(target)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]
    cache = TreeKVCache(target.config.num_hidden_layers, capacity=n + 400)
    causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
    forward(ids, torch.arange(n)[None], causal, cache)
    for rows in (1, 2, 4, 6, 8, 12, 16):
        seen = torch.cat([torch.ones(rows, n, dtype=torch.bool), torch.ones(rows, rows, dtype=torch.bool).tril()], 1)
        mask = additive_mask(seen[None], torch.bfloat16)
        tokens, positions = torch.arange(rows)[None] + 100, torch.arange(n, n + rows)[None]

        def step() -> torch.Tensor:
            cache.crop(n - cache.length)
            return forward(tokens, positions, mask, cache)

        hidden = step()[0]
        f = milliseconds(step)
        a = milliseconds(lambda: exact_argmax(target, hidden, argmax_head=head))  # noqa: B023
        print(f"rows {rows}: forward {f:.2f} ms, head+argmax {a:.2f} ms", flush=True)
