"""Does Inductor's int4 weight-only GEMM template (AMX micro-kernel, max_autotune + freezing) make wide
int4 products cheaper than aten's _weight_int4pack_mm_for_cpu? One SmolLM2-135M-sized stack of linears."""

import sys
import time

import torch
import torch._inductor.config as ic
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(2)
LAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
MODE = sys.argv[2] if len(sys.argv) > 2 else "all"
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down
G = 32


class Q4(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
        sz = torch.stack([torch.rand(k // G, n) * 0.01, torch.randn(k // G, n) * 0.01], -1)
        self.register_buffer("sz", sz.to(torch.bfloat16).contiguous())
        self.k = k

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, G, self.sz)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleList([Q4(k, n) for _ in range(LAYERS) for k, n in SHAPES])

    def forward(self, x):
        acc = x
        for i in range(0, len(self.mods), 4):
            q = self.mods[i](acc)
            o = self.mods[i + 1](q[:, :576].contiguous())
            gu = self.mods[i + 2](o)
            acc = acc + self.mods[i + 3]((gu[:, :1536] * gu[:, 1536:]).contiguous())
        return acc


def timeit(fn, x, reps=20):
    for _ in range(3):
        fn(x)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t) / reps * 1000


model = Stack().eval()
ms = [1, 2, 4, 8, 16, 32]
with torch.no_grad():
    if MODE in ("all", "eager"):
        print("eager", {m: round(timeit(model, torch.randn(m, 576, dtype=torch.bfloat16)), 2) for m in ms}, flush=True)
    if MODE in ("all", "auto"):
        ic.freezing = True
        ic.max_autotune = True
        ic.max_autotune_gemm_backends = "CPP,ATEN"
        res = {}
        for m in ms:
            torch._dynamo.reset()
            f = torch.compile(model, dynamic=False)
            x = torch.randn(m, 576, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            f(x)
            c = time.perf_counter() - t0
            res[m] = (round(timeit(f, x), 2), round(c, 1))
            print("autotune", m, res[m], flush=True)
