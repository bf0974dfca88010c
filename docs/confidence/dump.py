"""Greedy outputs (token ids) of the default engine for a prompt set, with its steps: what simulate.py
replays. Resumable (prompts already in OUT are skipped).

    python docs/confidence/dump.py PROMPTS.jsonl PER_CATEGORY OUT.jsonl MAX_NEW_TOKENS    # PER_CATEGORY 0: all
"""

import json
import sys
import time

from redrafter.api import ReDrafter
from redrafter.prompts import per_category, read_prompts

path, count, out, max_new = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
prompts = read_prompts(path)
if count:
    prompts = per_category(prompts, count)
rd = ReDrafter.from_pretrained()
done = set()
try:
    with open(out) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):  # cut off mid-line by an interruption: write it again
        with open(out, "w") as f:
            f.writelines(lines[:-1])
        lines = lines[:-1]
    done = {json.loads(line)["index"] for line in lines}
except FileNotFoundError:
    pass
t0 = time.time()
with open(out, "a") as f:
    for i, p in enumerate(prompts):
        if i in done:
            continue
        ids = rd.encode(p.text)
        g = rd.generate(p.text, max_new_tokens=max_new)
        f.write(
            json.dumps({"index": i, "category": p.category, "prompt": ids, "answer": g.token_ids, "steps": g.steps})
            + "\n"
        )
        f.flush()
        print(i, p.category, len(ids), g.new_tokens, round(g.tokens_per_step, 2), round(time.time() - t0), flush=True)
