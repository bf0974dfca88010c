"""Milliseconds of a fused w4a8 prefill by prompt length (Spec-Bench RAG passages cut to each length, best of
3), the kernels of a commit against this tree's (with optional extra -D flags), each in its own process,
3 rounds interleaved; each cache's last layer's keys hashed.

    python docs/prefetch/prefill_schedule.py [BASE [-DNAME=V ...]]   # BASE's kernels (default c69f152) against ours
"""

import hashlib
import json
import subprocess
import sys
import time

LENGTHS = (300, 800, 1200, 2400)


def child(flags):
    import torch

    from redrafter import kernels

    if flags and flags[0].startswith("commit="):
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp())
        commit = flags.pop(0).split("=")[1]
        for name in ("attention.c", "head.c", "layer.c", "w4a8.c", "kernels.h"):
            text = subprocess.run(
                ["git", "show", f"{commit}:src/redrafter/kernels/{name}"], capture_output=True, check=True
            ).stdout
            (folder / name).write_bytes(text)
        kernels.SOURCES, kernels.HEADERS = sorted(folder.glob("*.c")), sorted(folder.glob("*.h"))
    kernels.FLAGS.extend(flags)
    from redrafter.kv_cache import TreeKVCache
    from redrafter.lean_decoder import target_forward
    from redrafter.models import gguf_source, load_target
    from redrafter.quant import quantize_target
    from redrafter.tree import additive_mask

    rows = [json.loads(line) for line in open("../shared/data/spec_bench.jsonl")]
    out = {}
    with torch.inference_mode():
        target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
        quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
        lean = target_forward(target)
        tokens = tokenizer(" ".join(r["turns"][0] for r in rows[400:440]), add_special_tokens=False)["input_ids"]
        for n in LENGTHS:
            ids, positions = torch.tensor([tokens[:n]]), torch.arange(n)[None]
            mask = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
            lean.make_tables(n, ids.device)
            best = 1e9
            for _ in range(3):
                cache = TreeKVCache(len(lean.layers), capacity=n + 64)
                cache.allocate(1, lean.kv_heads, lean.head_dim, torch.bfloat16, ids.device)
                s = time.perf_counter()
                lean.run_fused(ids, positions, mask, cache)
                best = min(best, time.perf_counter() - s)
            h = hashlib.sha256(
                cache.layers[-1].keys[:, :, :n].contiguous().view(torch.uint8).numpy().tobytes()
            ).hexdigest()[:10]
            out[n] = (round(best * 1e3, 1), h)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        sys.exit()
    base = sys.argv[1] if len(sys.argv) > 1 else "c69f152"
    variants = {"base": [f"commit={base}"], "new": sys.argv[2:]}
    for r in range(3):
        for name, flags in variants.items():
            res = subprocess.run([sys.executable, __file__, "--child", *flags], capture_output=True, text=True)
            print(
                r, name, res.stdout.strip().splitlines()[-1] if res.stdout.strip() else res.stderr[-2000:], flush=True
            )
