"""The context lookup's longest suffix (LookupBeams max_ngram) 3 against longer ones, interleaved per
prompt, 256 new tokens: N prompts a category, or with sliceN the prompts 41.. 40+N of Spec-Bench's rag
and summarization categories (disjoint from the first 6 a category that the reports use).

    python docs/tried-32/lookup_suffix.py ../shared/data/mt_bench.jsonl 2 3 6
    python docs/tried-32/lookup_suffix.py ../shared/data/spec_bench.jsonl slice3 3 6
"""

import sys

import redrafter.decode as decode
from redrafter.api import ReDrafter
from redrafter.lookup import LookupBeams
from redrafter.prompts import per_category, read_prompts

rd = ReDrafter.from_pretrained("default")
settings = [int(a) for a in sys.argv[3:]]


def with_max(n):
    class Lookup(LookupBeams):
        def __init__(self, *a, **k):
            k.setdefault("max_ngram", n)
            super().__init__(*a, **k)

    return Lookup


everything = read_prompts(sys.argv[1])
if sys.argv[2].startswith(
    "slice"
):  # prompts 40.. 40+N of the copy-heavy categories: disjoint from the report's first 6
    count = int(sys.argv[2][5:])
    prompts = [
        p
        for c in ("rag", "summarization", "extraction")
        for p in [q for q in everything if q.category == c][40 : 40 + count]
    ]
else:
    prompts = per_category(everything, int(sys.argv[2]))
cats = sorted({p.category for p in prompts})
tot = {(n, c): [0.0, 0, 0] for n in settings for c in cats}
for i, p in enumerate(prompts):
    ids = rd.encode(p.text)
    outs = []
    for n in settings if i % 2 == 0 else settings[::-1]:
        decode.LookupBeams = with_max(n)
        g = rd.generate_ids([ids], 256)[0]
        t = tot[n, p.category]
        t[0] += g.seconds
        t[1] += g.new_tokens
        t[2] += g.steps
        outs.append(g.token_ids)
    assert all(o == outs[0] for o in outs)
for c in cats:
    print(
        c,
        "  ".join(
            f"max {n}: {tot[n, c][1] / tot[n, c][0]:6.1f} tok/s {tot[n, c][1] / tot[n, c][2]:.2f} tok/step"
            for n in settings
        ),
    )
for n in settings:
    s = sum(tot[n, c][0] for c in cats)
    k = sum(tot[n, c][1] for c in cats)
    st = sum(tot[n, c][2] for c in cats)
    print(f"all: max {n}: {k / s:.1f} tok/s, {k / st:.2f} tok/step")
