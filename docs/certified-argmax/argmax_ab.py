"""exact_argmax alone (the Q8_0 head of the default model, w4a8), 1 and 6 random rows, best of 5 means of 100
calls.
Run it alternately against two checkouts to compare them in separate processes, as for the table in
README.md (old: commit 3f26218, the top-8 candidates):

    git worktree add /tmp/old 3f26218
    for i in 1 2 3; do PYTHONPATH=/tmp/old/src python docs/certified-argmax/argmax_ab.py old;
                       python docs/certified-argmax/argmax_ab.py new; done
"""

import sys
import time

import torch

import redrafter
from redrafter.models import gguf_source, load_target
from redrafter.quant import gguf_argmax_head
from redrafter.sampling import exact_argmax

with torch.inference_mode():
    target, tok = load_target("default", dtype=torch.bfloat16, device="cpu")
    head = gguf_argmax_head(target, gguf_source("default"), "w4a8")
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(16, 576, generator=g) * 3).to(torch.bfloat16)
    out = []
    for rows in (1, 6):
        x = X[:rows].contiguous()

        def f(x=x):
            return exact_argmax(target, x, argmax_head=head)

        for _ in range(30):
            f()
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(100):
                f()
            best = min(best, (time.perf_counter() - t) / 100 * 1e3)
        out.append(f"{rows} row(s) {best:.3f} ms")
    print(sys.argv[1], redrafter.__file__.split("/src/")[0], "; ".join(out))
