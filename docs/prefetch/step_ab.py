"""Milliseconds per fused w4a8 forward of the default model, our C kernels as built from two sources side
by side: each variant in its own process, the variants interleaved for --rounds rounds.

    python docs/prefetch/step_ab.py [--base a8aea92]      # the kernels of a commit against this tree's
    python docs/prefetch/step_ab.py --sweep PREFETCH=0,1024,2048,4096,8192,16384   # this tree's, with -DPREFETCH=...

A variant is a set of kernel sources (a commit's, by `git show`) and extra compiler flags (-DPREFETCH=N
overrides w4a8.c's distance in bytes, -DHEAD_AHEAD=N head.c's in outputs; sweep_ahead.txt came from
-DAHEAD=N, keys ahead in a patch of attention.c that was not kept); the Python side is this tree's (the kernels' signatures did not change).
Forwards: 1 and 5 tokens after a 107-token prompt (a plain step and a tree step), 1 and 6 tokens after a
1,000-token context; 200 of each after 3 to warm up, per round. Then the greedy step's certified argmax
(the Q8_0 screen, `exact_argmax`) and the sampling head (bfloat16, `BFloat16Head`) on 1 and 5 random rows.
"""

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "src/redrafter/kernels"
SHAPES = ((107, 1), (107, 5), (1000, 1), (1000, 6))


def child(sources: str, flags: list[str]) -> None:
    import torch

    from redrafter import kernels

    if sources != "tree":  # the kernels of a commit
        folder = Path(tempfile.mkdtemp())
        for name in subprocess.run(
            ["git", "ls-tree", "--name-only", sources, f"{KERNELS}/"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout.split():
            if name.endswith((".c", ".h")):
                text = subprocess.run(
                    ["git", "show", f"{sources}:{name}"], capture_output=True, cwd=ROOT, check=True
                ).stdout
                (folder / Path(name).name).write_bytes(text)
        kernels.SOURCES, kernels.HEADERS = sorted(folder.glob("*.c")), sorted(folder.glob("*.h"))
    kernels.FLAGS.extend(flags)
    from redrafter.head import cpu_head
    from redrafter.kv_cache import TreeKVCache
    from redrafter.lean_decoder import target_forward
    from redrafter.models import gguf_source, load_target
    from redrafter.quant import gguf_argmax_head, quantize_target
    from redrafter.sampling import exact_argmax
    from redrafter.tree import additive_mask

    rows = [json.loads(line) for line in open(ROOT.parent / "shared/data/spec_bench.jsonl")]
    text = " ".join(row["turns"][0] for row in rows[:200])
    with torch.inference_mode():
        target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
        quantize_target(target, "w4a8", gguf_source("default"), dense_prefill=False)
        forward = target_forward(target)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        result, bits = {}, {}  # milliseconds, and a hash of each output's bits
        for context, tokens in SHAPES:
            cache = TreeKVCache(target.config.num_hidden_layers, capacity=context + 64)
            causal = additive_mask(torch.ones(1, context, context, dtype=torch.bool).tril(), torch.bfloat16)
            forward(torch.tensor([ids[:context]]), torch.arange(context)[None], causal, cache)
            seen = torch.cat(
                [torch.ones(tokens, context, dtype=torch.bool), torch.ones(tokens, tokens).tril().bool()], 1
            )
            mask = additive_mask(seen[None], torch.bfloat16)
            step, positions = torch.arange(tokens)[None] + 100, torch.arange(context, context + tokens)[None]
            for repeat in range(203):
                if repeat == 3:
                    start = time.perf_counter()
                cache.crop(context - cache.length)
                hidden = forward(step, positions, mask, cache)
            result[f"{context}/{tokens}"] = (time.perf_counter() - start) / 200 * 1e3
            bits[f"{context}/{tokens}"] = hashlib.sha256(
                hidden.contiguous().view(torch.uint8).numpy().tobytes()
            ).hexdigest()[:12]
        heads = {
            "argmax": lambda x: exact_argmax(target, x, argmax_head=argmax_head),
            "sampling head": cpu_head(target),
        }
        argmax_head = gguf_argmax_head(target, gguf_source("default"), "w4a8")
        for name, head in heads.items():
            for tokens in (1, 5):
                hidden = torch.randn(tokens, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
                hidden = hidden.bfloat16()
                for repeat in range(203):
                    if repeat == 3:
                        start = time.perf_counter()
                    out = head(hidden)
                result[f"{name} {tokens}"] = (time.perf_counter() - start) / 200 * 1e3
                bits[f"{name} {tokens}"] = hashlib.sha256(
                    out.contiguous().view(torch.uint8).numpy().tobytes()
                ).hexdigest()[:12]
    print(json.dumps([result, bits]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", default="a8aea92", help="the commit whose kernels this tree's are compared with")
    parser.add_argument("--sweep", metavar="NAME=V1,V2,...", help="this tree's kernels built with -DNAME=V for each V")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.flags.split())
    if args.sweep:
        name, values = args.sweep.split("=")
        variants = {f"{name}={value}": ("tree", f"-D{name}={value}") for value in values.split(",")}
    else:
        variants = {args.base: (args.base, ""), "this tree": ("tree", "")}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    hashes: dict[str, list[str]] = {}
    for round_ in range(args.rounds):
        for name, (sources, flags) in variants.items() if round_ % 2 == 0 else reversed(variants.items()):
            command = [sys.executable, __file__, "--child", sources, f"--flags={flags}"]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            result, bits = json.loads(out.stdout.strip().splitlines()[-1])
            hashes.setdefault(json.dumps(bits, sort_keys=True), []).append(name)
            for shape, ms in result.items():
                times[name].setdefault(shape, []).append(ms)
            latest = ", ".join(f"{shape} {values[-1]:.2f}" for shape, values in times[name].items())
            print(f"round {round_ + 1}, {name}: {latest}", flush=True)
    print(f"\noutputs: {len(hashes)} distinct set(s) of bits across all runs of {', '.join(variants)}")
    print("median ms per forward (context/tokens):")
    for name, shapes in times.items():
        print(f"{name:>14}: " + ", ".join(f"{shape} {statistics.median(v):.2f}" for shape, v in shapes.items()))


if __name__ == "__main__":
    main()
