"""Milliseconds of one forward of n tokens of the default model (after 256 cached tokens, head and exact
argmax included) with bfloat16 GEMMs, with float32 GEMMs from 12 rows (what redrafter did where the
CPU lacks bfloat16 instructions, before Session 27), and with int4 weights; and a 256-token prefill of
each. ``--packed``: instead, float32 GEMMs from 12 rows, from 2 rows, and from 2 rows on copies
reordered once for oneDNN (what redrafter does where oneDNN converts bfloat16 as it goes, Session 27).

    python docs/avx2/cost_curve.py docs/avx2/cost_curve.json
    python docs/avx2/cost_curve.py docs/avx2/packed_float32.json --packed
"""

import json
import sys
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import forward_head, target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import Float32GemmLinear, quantize_target
from redrafter.sampling import exact_argmax
from redrafter.tree import additive_mask

torch.set_num_threads(2)
packed_series = "--packed" in sys.argv[2:]
SIZES = [1, 2, 4, 8, 12, 17, 24, 32] if packed_series else [1, 2, 4, 8, 12, 17, 32, 64]
CONTEXT = 256
if packed_series:  # kind -> (weights, float32 GEMMs, from how many rows, packed)
    kinds = {
        "float32 from 12 rows": ("float", True, 12, False),
        "float32 from 2 rows": ("float", True, 2, False),
        "float32 from 2 rows, packed": ("float", True, 2, True),
    }
else:
    kinds = {
        "bfloat16 GEMMs": ("float", False, None, False),
        "float32 GEMMs from 12 rows": ("float", True, 12, False),
        "int4": ("int4", None, None, False),
    }
series = {}
for kind, (weights, float32_gemms, min_rows, packed) in kinds.items():
    target, _ = load_target("default", dtype=torch.bfloat16)
    quantize_target(target, weights, gguf_source("default"), float32_gemms=float32_gemms)
    for module in target.modules():
        if isinstance(module, Float32GemmLinear) and min_rows is not None:
            module.min_rows = min_rows  # before the lean forward fuses them
    series[kind] = (target, target_forward(target, packed=packed))
prompt = torch.randint(0, 49152, (1, CONTEXT + max(SIZES)), generator=torch.Generator().manual_seed(0))
causal = additive_mask(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()[None], torch.bfloat16)
result = {"context": CONTEXT, "prefill_ms": {}, "ms_per_forward": {k: {} for k in kinds}}
caches = {}
with torch.inference_mode():
    for kind, (target, forward) in series.items():
        prefill = []
        for _ in range(3):
            caches[kind] = TreeKVCache(target.config.num_hidden_layers, capacity=CONTEXT + max(SIZES))
            start = time.perf_counter()
            forward(prompt[:, :CONTEXT], torch.arange(CONTEXT)[None], causal, caches[kind])
            prefill.append(1000 * (time.perf_counter() - start))
        result["prefill_ms"][kind] = round(sorted(prefill)[1], 1)
    times = {k: {n: [] for n in SIZES} for k in kinds}
    for repeat in range(9):  # the first two rounds warm up
        for n in SIZES:
            tokens, positions = prompt[:, CONTEXT : CONTEXT + n], torch.arange(CONTEXT, CONTEXT + n)[None]
            mask = torch.zeros(1, 1, n, CONTEXT + n, dtype=torch.bfloat16)
            for kind, (target, forward) in series.items():
                start = time.perf_counter()
                exact_argmax(target, forward(tokens, positions, mask, caches[kind]), head=forward_head(forward))
                if repeat >= 2:
                    times[kind][n].append(1000 * (time.perf_counter() - start))
                caches[kind].crop(-n)
for kind, rows in times.items():
    result["ms_per_forward"][kind] = {str(n): round(sorted(t)[len(t) // 2], 1) for n, t in rows.items()}
print(json.dumps(result, indent=1))
with open(sys.argv[1], "w") as handle:
    json.dump(result, handle, indent=1)
