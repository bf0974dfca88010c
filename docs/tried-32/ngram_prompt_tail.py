"""The corpus n-gram table built from each answer with the last 5 tokens of its prompt before it (the
chat template's assistant header: n-grams that reach into an answer's first tokens), against answers
alone: tokens a step of the n-gram beam alone, walking the held-out answers (every 25th).

    python docs/tried-32/ngram_prompt_tail.py data/corpus/smollm2-135m-instruct ...  # the 13 folders of make ngrams
"""

import sys
import time

from redrafter.ngrams import build_table, walk_tokens_per_step
from redrafter.train import load_corpora, split_heldout

pairs = load_corpora(sys.argv[1:])
train, held = split_heldout(len(pairs), 25)
print(len(pairs), "pairs; prompt tail example:", pairs[0][0][-6:])
for tail in (0, 5):
    t = time.time()
    table = build_table([(pairs[i][0][-tail:] if tail else []) + pairs[i][1] for i in train], 2, 6, 2)
    for length in (3, 4):
        rate = walk_tokens_per_step(table, [pairs[i] for i in held], length)
        # first 64 answer tokens only
        rate64 = walk_tokens_per_step(table, [(pairs[i][0], pairs[i][1][:64]) for i in held], length)
        print(
            f"prompt tail {tail}: {len(table):,} n-grams; beam of {length}: held-out {rate:.3f} tokens a step,"
            f" first 64 tokens {rate64:.3f} ({time.time() - t:.0f} s)"
        )
