"""The products alone: ``F.linear`` against a weight packed once for oneDNN (``quant.PackedLinear``),
for the default model's layer shapes and its head: whether they are equal bit for bit over 1 to 128
rows, and microseconds per call (medians of 60) at several row counts (docs/packed/README.md).

Run: python docs/packed/products.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from redrafter.quant import PACKED_LAYOUT_ROWS

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))  # qkv, o, gate_up, down, head
ROWS = (1, 8, 24, 48, 64, 96, 128, 256)


def median_us(call, repeats: int = 60) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e6


def packed_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    for outputs, inputs in SHAPES:
        weight = (torch.randn(outputs, inputs, generator=generator) * 0.05).to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_LAYOUT_ROWS)
        differ = []
        for rows in range(1, 129):
            x = torch.randn(1, rows, inputs, generator=generator).to(torch.bfloat16)
            if not torch.equal(packed_product(x, packed), F.linear(x, weight)):
                differ.append(rows)
        timings = []
        for rows in ROWS:
            x = torch.randn(rows, inputs, generator=generator).to(torch.bfloat16)
            plain = median_us(lambda x=x, weight=weight: F.linear(x, weight))
            reordered = median_us(lambda x=x, packed=packed: packed_product(x, packed))
            timings.append(f"{rows}: {plain:.0f}/{reordered:.0f}")
        print(f"{outputs} x {inputs}: differ at rows {differ or 'none'}; us F.linear/packed " + "  ".join(timings))


if __name__ == "__main__":
    main()
