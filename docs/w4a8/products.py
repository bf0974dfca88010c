"""The 120 matrix products of one forward of the default model, timed alone per precision and row count.

    python docs/w4a8/products.py w4a8   # or int4

Random bfloat16 inputs; the layers as the lean forward fuses them (qkv, o_proj, gate_up, down_proj).
"""

import sys
import time

import torch

from redrafter.lean_decoder import LeanDecoder
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target

weights = sys.argv[1]
target, _ = load_target("default", dtype=torch.bfloat16, device="cpu")
quantize_target(target, weights, gguf_source("default"), dense_prefill=False)
lean = LeanDecoder(target)
products = [getattr(layer, name) for layer in lean.layers for name in ("qkv", "o_proj", "gate_up", "down_proj")]
with torch.inference_mode():
    for rows in (1, 4, 8, 16):
        inputs = [torch.randn(1, rows, p.in_features, dtype=torch.bfloat16) for p in products]
        for _ in range(3):
            for product, x in zip(products, inputs, strict=True):
                product(x)
        start = time.perf_counter()
        for _ in range(20):
            for product, x in zip(products, inputs, strict=True):
                product(x)
        milliseconds = (time.perf_counter() - start) / 20 * 1000
        print(f"{weights} {rows:2d} rows: {milliseconds:.2f} ms for {len(products)} products")
