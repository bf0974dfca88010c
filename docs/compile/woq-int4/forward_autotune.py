"""One int4 target forward of n tokens (after 256 cached): compiled as ``--compile`` does
(``default``), or with Inductor's max-autotune and freezing, meant to offer its AMX int4 template:
the lean forward's method compiled with dynamic shapes (``autotune``) or static ones
(``autotune-static``), or wrapped in a module whose weights freezing folds (``autotune-module``).
One way per process; a third argument ``no-grad`` runs under no_grad instead of inference_mode.

    python docs/compile/woq-int4/forward_autotune.py default 1,4,8,16,32
    python docs/compile/woq-int4/forward_autotune.py autotune-module 1,16 no-grad

Prints the compile time and, per n, the median of 12 rounds of 3 forwards (the head excluded).
Grep its output for AUTOTUNE to see whether the template was offered.
"""

import sys
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import LeanDecoder
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

CONTEXT = 256
OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
torch.set_num_threads(2)
mode, sizes = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
target, _ = load_target("default", dtype=torch.bfloat16, device="cpu")
quantize_target(target, "int4", gguf_source("default"))
lean = LeanDecoder(target)
lean.make_tables(4096, torch.device("cpu"))


class Run(torch.nn.Module):
    """The lean forward as a module's own forward (freezing folds only a compiled module's weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.lean = lean

    def forward(self, *args):
        return self.lean.run(*args)


compiled = Run() if mode == "autotune-module" else lean.run
run = torch.compile(compiled, dynamic=mode != "autotune-static", options=None if mode == "default" else OPTIONS)
config = target.config
prompt = torch.randint(0, config.vocab_size, (1, CONTEXT + max(sizes)), generator=torch.Generator().manual_seed(0))
cache = TreeKVCache(config.num_hidden_layers, capacity=CONTEXT + max(sizes) + 8)


def step(n: int) -> None:
    mask = torch.zeros(1, 1, n, CONTEXT + n, dtype=torch.bfloat16)
    run(prompt[:, CONTEXT : CONTEXT + n].contiguous(), torch.arange(CONTEXT, CONTEXT + n)[None], mask, cache)
    cache.crop(-n)


with torch.no_grad() if "no-grad" in sys.argv else torch.inference_mode():
    causal = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()[None]
    lean.run(prompt[:, :CONTEXT], torch.arange(CONTEXT)[None], additive_mask(causal, torch.bfloat16), cache)
    start = time.perf_counter()
    for n in sizes:
        step(n)
        step(n)
    print(f"{mode}: compile s {time.perf_counter() - start:.1f}", flush=True)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(12):
        for n in sizes:
            start = time.perf_counter()
            for _ in range(3):
                step(n)
            times[n].append((time.perf_counter() - start) / 3 * 1000)
    for n in sizes:
        print(f"{mode}: n={n:3d} {sorted(times[n])[6]:6.1f} ms", flush=True)
