"""Prefill of prompts that join a batch together: one left-padded forward over all of them, against
forwards per group of similar lengths (``decode.prefill_groups``, what ``RunningBatch.add`` does now),
interleaved, medians of 5; and whether every row's first token agrees. Default model, bfloat16, 2
threads, through the chat template: MT-Bench's first 16 (then 4) prompts, and 16 (then 4) of
Spec-Bench's other kinds (every 25th from the 81st: translation, summarization, QA, math, RAG).

    python docs/serve/prefill_groups.py docs/serve/prefill_groups.json
"""

import json
import statistics
import sys
import time

import torch

from redrafter.api import ReDrafter
from redrafter.decode import RunningBatch, prefill_groups
from redrafter.sampling import SamplingParams, TokenChooser

torch.set_num_threads(2)
rd = ReDrafter.from_pretrained("default")
decoder = rd.decoder
result = {}
chooser = TokenChooser(rd.target, SamplingParams(), decoder.argmax_head, decoder.head)
for path in ("../shared/data/mt_bench.jsonl", "../shared/data/spec_bench.jsonl"):
    with open(path) as handle:
        prompts = [rd.encode(json.loads(line)["turns"][0]) for line in handle]
    if "spec_bench" in path:
        prompts = prompts[80::25]
    for size in (16, 4):
        chosen = prompts[:size]
        times: dict[str, list[float]] = {"one forward": [], "grouped": []}
        firsts = {}
        for _ in range(5):
            for way in times:
                batch = RunningBatch(decoder, chooser)
                ids = list(range(size))
                start = time.perf_counter()
                if way == "one forward":
                    rows = batch._prefilled(ids, chosen, 64)
                else:
                    batch.add(chosen, [64] * size)
                    rows = batch.rows
                times[way].append(1000 * (time.perf_counter() - start))
                firsts[way] = rows.last_token.tolist()
        name = f"{path.split('/')[-1].removesuffix('.jsonl')}, {size} prompts"
        result[name] = {
            "lengths": [len(p) for p in chosen],
            "groups": prefill_groups([len(p) for p in chosen]),
            "ms": {way: round(statistics.median(t), 1) for way, t in times.items()},
            "same_first_tokens": firsts["one forward"] == firsts["grouped"],
        }
        print(name, json.dumps(result[name]), flush=True)
with open(sys.argv[1], "w") as handle:
    json.dump(result, handle, indent=1)
