"""Milliseconds of the 211 products of one forward of a SmolLM2-135M-shaped model (30 layers of the
fused qkv, o, gate-up and down products, random weights, bfloat16 activations, 2 threads) over n rows,
three ways, interleaved, medians of 15: bfloat16 ``F.linear``, float32 ``F.linear`` on a float32 copy
(what ``quant.Float32GemmLinear`` runs), and oneDNN's float32 product on that copy reordered once
(``quant.PackedLinear``). Where the crossings lie sets ``FLOAT32_GEMM_MIN_ROWS_CONVERTING`` and
``FLOAT32_PACKED_MIN_ROWS``.

    python docs/avx2/products.py docs/avx2/products.json
"""

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from redrafter.quant import PACKED_LAYOUT_ROWS

ROWS = [1, 2, 3, 4, 5, 8, 12, 17, 24, 32]
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # [N, K], the head last
torch.set_num_threads(2)
generator = torch.Generator().manual_seed(0)
weights = [(torch.randn(n, k, generator=generator) * 0.02).bfloat16() for n, k in SHAPES]
copies = [w.float() for w in weights]
packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACKED_LAYOUT_ROWS) for w in copies]
inputs = {n: {k: torch.randn(n, k, generator=generator).bfloat16() for k in {k for _, k in SHAPES}} for n in ROWS}


def products(n: int, kind: str) -> float:
    start = time.perf_counter()
    for weight, copy, reordered in zip(weights, copies, packed, strict=True):
        x = inputs[n][weight.shape[1]]
        if kind == "bfloat16":
            F.linear(x, weight)
        elif kind == "float32":
            F.linear(x.float(), copy).bfloat16()
        else:
            torch.ops.mkldnn._linear_pointwise(x.float(), reordered, None, "none", [], "").bfloat16()
    return 1000 * (time.perf_counter() - start)


kinds = ["bfloat16", "float32", "float32 packed"]
times = {kind: {n: [] for n in ROWS} for kind in kinds}
with torch.inference_mode():
    for repeat in range(17):  # the first two rounds warm up
        for n in ROWS:
            for kind in kinds:
                elapsed = products(n, kind)
                if repeat >= 2:
                    times[kind][n].append(elapsed)
result = {kind: {str(n): round(statistics.median(t), 1) for n, t in rows.items()} for kind, rows in times.items()}
print(json.dumps(result, indent=1))
with open(sys.argv[1], "w") as handle:
    json.dump(result, handle, indent=1)
