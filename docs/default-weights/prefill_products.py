"""The products of one forward of the default model over N rows (a prefill's: the lean forward's 120,
its query, key and value layers fused, and its gate and up ones): the int4 kernel against ``F.linear``
on the same weights dequantized (``Int4Linear.dense``: float32 where bfloat16 products lack
instructions); medians of 5.

Usage: python docs/default-weights/prefill_products.py [ROWS,...]   (default 8,16,24,32,64,256,700)
"""

import statistics
import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.lean_decoder import PRODUCTS

counts = [int(n) for n in (sys.argv[1] if len(sys.argv) > 1 else "8,16,24,32,64,256,700").split(",")]
rd = ReDrafter.from_pretrained(weights="int4", drafter="none")
products = [getattr(layer, name) for layer in rd.decoder.forward.layers for name in PRODUCTS]
print(f"{len(products)} products, dense copies in {products[0].dense.dtype}")


def median_ms(run) -> float:
    run()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


torch.manual_seed(0)
for rows in counts:
    pairs = [(layer, torch.randn(rows, layer.in_features, dtype=torch.bfloat16)) for layer in products]
    kernel = median_ms(lambda pairs=pairs: [layer(x) for layer, x in pairs])
    dense = median_ms(lambda pairs=pairs: [layer.dense_product(x) for layer, x in pairs])
    print(f"{rows:>4} rows: int4 kernel {kernel:7.1f} ms, dense {dense:7.1f} ms")
