"""One int4 target forward of n tokens (after 256 cached), compiled one way per process:

- ``default``: as ``--compile`` did before Session 20 (dynamic shapes, aten's int4 kernel);
- ``options``: Inductor's ``freezing`` and GEMM autotuning passed as ``torch.compile(options=...)``
  (Session 19's try: autotunes nothing, because dynamo reads ``freezing`` while it traces, before
  the backend's options apply, so the weights stay graph inputs and the template is not offered);
- ``autotune`` / ``autotune-static``: the same settings in force while dynamo traces (as
  ``CompiledDecoder`` sets them around each call), dynamic shapes or one graph per size;
- ``buckets``: what ``--compile`` does now with int4 weights (``CompiledDecoder``: the products'
  rows padded to ``INT4_ROW_BUCKETS``, a graph per bucket).

    python docs/compile/woq-int4/forward_autotune.py autotune-static 1,2,4,8,16,32,64

Prints the compile time and, per n, the median of 12 rounds of 3 forwards (the head excluded).
Grep its output for AUTOTUNE to see whether the template was offered (a compile from Inductor's
cache logs none: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` for a cold one). ``autotune`` autotunes
its products at the first size of more than one token (its graph's size hint): list that first.
"""

import sys
import time
from contextlib import nullcontext

import torch
import torch._inductor.config as inductor_config

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

CONTEXT = 256
OPTIONS = {"freezing": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN"}
torch.set_num_threads(2)
mode, sizes = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
target, _ = load_target("default", dtype=torch.bfloat16, device="cpu")
quantize_target(target, "int4", gguf_source("default"))
if mode == "buckets":
    run = target_forward(target, compile=True)
    assert run.row_buckets, "this CPU gets no autotuned int4 products"
else:
    lean = target_forward(target)
    lean.make_tables(4096, torch.device("cpu"))
    compiled = torch.compile(
        lean.run, dynamic=mode != "autotune-static", options=OPTIONS if mode == "options" else None
    )
    settings = inductor_config.patch(OPTIONS) if mode.startswith("autotune") else nullcontext()

    def run(*args):
        with settings:
            return compiled(*args)


config = target.config
prompt = torch.randint(0, config.vocab_size, (1, CONTEXT + max(sizes)), generator=torch.Generator().manual_seed(0))
cache = TreeKVCache(config.num_hidden_layers, capacity=CONTEXT + max(sizes) + 8)


def step(n: int) -> None:
    mask = torch.zeros(1, 1, n, CONTEXT + n, dtype=torch.bfloat16)
    run(prompt[:, CONTEXT : CONTEXT + n].contiguous(), torch.arange(CONTEXT, CONTEXT + n)[None], mask, cache)
    cache.crop(-n)


with torch.inference_mode():
    causal = additive_mask(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()[None], torch.bfloat16)
    target_forward(target)(prompt[:, :CONTEXT], torch.arange(CONTEXT)[None], causal, cache)
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
