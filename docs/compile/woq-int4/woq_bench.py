"""Does Inductor's int4 weight-only GEMM template (AMX micro-kernel, max_autotune + freezing) make wide
int4 products cheaper than aten's _weight_int4pack_mm_for_cpu? One SmolLM2-135M-sized stack of linears.

    python docs/compile/woq-int4/woq_bench.py 30 eager   # or: auto, all
"""

import sys
import time

import torch
import torch._inductor.config as inductor_config
from torch import nn

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down
GROUP = 32


class Int4Product(nn.Module):
    """``x [M, k]`` times random int4 codes ``[n, k]`` (groups of 32) with ``aten``'s CPU kernel;
    ``reshape``: the input is reshaped to ``[-1, k]`` first, as ``Int4Linear`` does."""

    def __init__(self, k: int, n: int, reshape: bool = False) -> None:
        super().__init__()
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        tables = torch.stack([torch.rand(k // GROUP, n) * 0.01, torch.randn(k // GROUP, n) * 0.01], -1)
        self.register_buffer("tables", tables.to(torch.bfloat16).contiguous())
        self.k, self.reshape = k, reshape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.k).contiguous() if self.reshape else x
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.tables)


class Stack(nn.Module):
    """``layers`` x (qkv, o, gate-up, down) products, chained with the shapes of a decoder layer."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.products = nn.ModuleList([Int4Product(k, n) for _ in range(layers) for k, n in SHAPES])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(0, len(self.products), 4):
            qkv = self.products[i](out)
            attended = self.products[i + 1](qkv[:, :576].contiguous())
            gate_up = self.products[i + 2](attended)
            out = out + self.products[i + 3]((gate_up[:, :1536] * gate_up[:, 1536:]).contiguous())
        return out


def milliseconds(fn, x: torch.Tensor, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - start) / reps * 1000


def main(layers: int, mode: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Stack(layers).eval()
    rows = [1, 2, 4, 8, 16, 32]
    with torch.no_grad():
        if mode in ("all", "eager"):
            eager = {m: round(milliseconds(model, torch.randn(m, 576, dtype=torch.bfloat16)), 2) for m in rows}
            print("eager", eager, flush=True)
        if mode in ("all", "auto"):
            inductor_config.freezing = True
            inductor_config.max_autotune = True
            inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
            for m in rows:
                torch._dynamo.reset()
                compiled = torch.compile(model, dynamic=False)
                x = torch.randn(m, 576, dtype=torch.bfloat16)
                start = time.perf_counter()
                compiled(x)
                compile_seconds = time.perf_counter() - start
                print("autotune", m, (round(milliseconds(compiled, x), 2), round(compile_seconds, 1)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30, sys.argv[2] if len(sys.argv) > 2 else "all")
