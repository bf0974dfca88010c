"""Time to first token with the default (int4) weights: prefills on the int4 layers' dequantized
copies (``LeanDecoder.dense_layers``) against the int4 kernel, interleaved, medians of 3, on the first
prompt of each Spec-Bench category (chat template).

Usage: python docs/default-weights/prefill_ab.py ../shared/data/spec_bench.jsonl OUT.json
"""

import json
import statistics
import sys
import time

from redrafter.api import ReDrafter
from redrafter.prompts import per_category, read_prompts

rd = ReDrafter.from_pretrained(drafter="none")
lean = rd.decoder.forward
dense_layers = lean.dense_layers
assert dense_layers is not None, "no dense copies: not an int4 target in bfloat16 or float16"
rows = []
for prompt in per_category(read_prompts(sys.argv[1]), 1):
    ids = rd.encode(prompt.text)
    seconds: dict[str, list[float]] = {"dense": [], "int4": []}
    for _ in range(3):
        for name, layers in (("dense", dense_layers), ("int4", None)):
            lean.dense_layers = layers
            start = time.perf_counter()
            first = rd.generate_ids([ids], 1)[0].token_ids
            seconds[name].append(time.perf_counter() - start)
    lean.dense_layers = dense_layers
    row = {"category": prompt.category, "tokens": len(ids), "first_token": first}
    row |= {f"{name}_ms": round(1000 * statistics.median(values), 1) for name, values in seconds.items()}
    rows.append(row)
    print(f"{prompt.category:<15} {len(ids):>5} tokens: dense {row['dense_ms']:7.1f} ms, int4 {row['int4_ms']:7.1f} ms")
with open(sys.argv[2], "w") as out:
    json.dump(rows, out, indent=1)
