"""One target forward of n tokens (after 256 cached), the lean forward eager against compiled,
interleaved in one process; the head and exact argmax included, as a decode step runs them.

    python docs/compile/forward_ab.py int4 1,2,4,8,17

Prints the compile time and, per n, the medians of 12 rounds of 3 forwards each way.
"""

import sys
import time

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import gguf_argmax_head, quantize_target
from redrafter.sampling import exact_argmax
from redrafter.tree import additive_mask

CONTEXT = 256
torch.set_num_threads(2)
weights, sizes = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
target, _ = load_target("default", dtype=torch.bfloat16, device="cpu")
quantize_target(target, weights, gguf_source("default"))
head = gguf_argmax_head(target, gguf_source("default"))
forwards = {"eager": target_forward(target), "compiled": target_forward(target, compile=True)}
config = target.config
prompt = torch.randint(0, config.vocab_size, (1, CONTEXT + max(sizes)), generator=torch.Generator().manual_seed(0))
cache = TreeKVCache(config.num_hidden_layers, capacity=CONTEXT + max(sizes))


def step(forward, n: int) -> None:
    mask = torch.zeros(1, 1, n, CONTEXT + n, dtype=torch.bfloat16)
    hidden = forward(prompt[:, CONTEXT : CONTEXT + n], torch.arange(CONTEXT, CONTEXT + n)[None], mask, cache)
    exact_argmax(target, hidden, argmax_head=head)
    cache.crop(-n)


with torch.inference_mode():
    causal = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).tril()[None]
    forwards["eager"](prompt[:, :CONTEXT], torch.arange(CONTEXT)[None], additive_mask(causal, torch.bfloat16), cache)
    start = time.perf_counter()
    for n in sizes:
        step(forwards["compiled"], n)
        step(forwards["compiled"], n)
    print(f"compile s {time.perf_counter() - start:.1f}")
    times = {(name, n): [] for name in forwards for n in sizes}
    for _ in range(12):
        for n in sizes:
            for name, forward in forwards.items():
                step(forward, n)
                start = time.perf_counter()
                for _ in range(3):
                    step(forward, n)
                times[name, n].append((time.perf_counter() - start) / 3 * 1000)
    for n in sizes:
        eager, compiled = (sorted(times[name, n])[6] for name in forwards)
        print(f"n={n:3d} eager {eager:6.1f} ms  compiled {compiled:6.1f} ms  ratio {eager / compiled:.2f}")
