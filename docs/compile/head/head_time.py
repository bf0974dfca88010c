"""The default model's head over 1, 2 and 4 rows with int4 weights (Session 21, docs/compile/README.md):

- ms per call (median of 20) of the bfloat16 head, the quick head (the GGUF's Q8_0 values as int4
  codes, ``quant.gguf_argmax_head``), ``exact_argmax`` with it, and the quick head and its top-k
  compiled with the forward's autotuning settings (Inductor prints what it timed);
- a 4-bit copy of the bfloat16 head (groups of 32): its time, its logits' error on real hidden
  states, and the candidates left by a per-row bound on that error (rows' error norm times the
  hidden state's norm).

    HF_HUB_OFFLINE=1 python docs/compile/head/head_time.py
"""

import time

import torch
import torch._inductor.config as inductor_config

from redrafter.lean_decoder import INT4_AUTOTUNE
from redrafter.models import gguf_source, load_target
from redrafter.quant import Int4Linear, gguf_argmax_head, quantize_int4, quantize_target
from redrafter.sampling import exact_argmax

torch.set_num_threads(2)
target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
quantize_target(target, "int4", gguf_source("default"))
quick = gguf_argmax_head(target, gguf_source("default"))
weight = target.get_output_embeddings().weight.detach()
codes = quantize_int4(weight.float())
four_bit = Int4Linear(codes, None, torch.bfloat16)


def median_ms(fn, x, reps: int = 20) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[reps // 2]


compiled_topk = torch.compile(lambda x: quick(x).topk(8, dim=-1).indices, dynamic=False)


def compiled(x):
    with inductor_config.patch(INT4_AUTOTUNE):
        return compiled_topk(x)


with torch.inference_mode():
    for rows in (1, 2, 4):
        x = torch.randn(rows, weight.shape[1], dtype=torch.bfloat16) * 3
        timings = {
            "bf16": median_ms(lambda x: x @ weight.T, x),
            "quick": median_ms(quick, x),
            "exact_argmax": median_ms(lambda x: exact_argmax(target, x, argmax_head=quick), x),
            "compiled": median_ms(compiled, x),
            "4-bit copy": median_ms(four_bit, x),
        }
        print(f"rows {rows}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items()), flush=True)
    ids = tokenizer("Write a short poem about the sea, then explain its meter.", return_tensors="pt").input_ids
    hidden = target.model(ids).last_hidden_state[0]  # [T, d]
    exact = hidden.float() @ weight.float().T
    error = four_bit(hidden).float() - exact
    bound = (weight.float() - codes.dequantize()).norm(dim=1)[None] * hidden.float().norm(dim=1, keepdim=True)
    best_lower = (exact + error - bound).max(dim=1).values
    candidates = ((exact + error + bound) >= best_lower[:, None]).sum(dim=1)
    print(f"4-bit copy: error std {error.std():.2f}, max {error.abs().max():.2f}; bound median {bound.median():.1f}")
    print(f"candidates the bound leaves, per position: {candidates.tolist()}")
