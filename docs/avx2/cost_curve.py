"""Milliseconds of one forward of n tokens of the default model (after 256 cached ones, head and exact
argmax included) with bfloat16 GEMMs, with float32 GEMMs from 12 rows (what redrafter does where the
CPU lacks bfloat16 instructions), and with int4 weights; and a 256-token prefill of each.

    python docs/avx2/cost_curve.py docs/avx2/cost_curve.json
"""

import json
import sys
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.sampling import exact_argmax
from redrafter.tree import additive_mask

SIZES = [1, 2, 4, 8, 12, 17, 32, 64]
CONTEXT = 256
torch.set_num_threads(2)
kinds = {"bfloat16 GEMMs": ("float", False), "float32 GEMMs from 12 rows": ("float", True), "int4": ("int4", None)}
targets = {}
for kind, (weights, float32_gemms) in kinds.items():
    target, _ = load_target("default", dtype=torch.bfloat16)
    quantize_target(target, weights, gguf_source("default"), float32_gemms=float32_gemms)
    targets[kind] = target
prompt = torch.randint(0, 49152, (1, CONTEXT + max(SIZES)), generator=torch.Generator().manual_seed(0))
causal = additive_mask(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()[None], torch.bfloat16)
result = {"context": CONTEXT, "prefill_ms": {}, "ms_per_forward": {k: {} for k in kinds}}
caches = {}
with torch.inference_mode():
    for kind, target in targets.items():
        prefill = []
        for _ in range(3):
            caches[kind] = TreeKVCache(target.config.num_hidden_layers, capacity=CONTEXT + max(SIZES))
            start = time.perf_counter()
            target_forward(target)(prompt[:, :CONTEXT], torch.arange(CONTEXT)[None], causal, caches[kind])
            prefill.append(1000 * (time.perf_counter() - start))
        result["prefill_ms"][kind] = round(sorted(prefill)[1], 1)
    times = {k: {n: [] for n in SIZES} for k in kinds}
    for repeat in range(9):  # the first two rounds warm up
        for n in SIZES:
            tokens, positions = prompt[:, CONTEXT : CONTEXT + n], torch.arange(CONTEXT, CONTEXT + n)[None]
            mask = torch.zeros(1, 1, n, CONTEXT + n, dtype=torch.bfloat16)
            for kind, target in targets.items():
                start = time.perf_counter()
                exact_argmax(target, target_forward(target)(tokens, positions, mask, caches[kind]))
                if repeat >= 2:
                    times[kind][n].append(1000 * (time.perf_counter() - start))
                caches[kind].crop(-n)
for kind, rows in times.items():
    result["ms_per_forward"][kind] = {str(n): round(sorted(t)[len(t) // 2], 1) for n, t in rows.items()}
print(json.dumps(result, indent=1))
with open(sys.argv[1], "w") as handle:
    json.dump(result, handle, indent=1)
