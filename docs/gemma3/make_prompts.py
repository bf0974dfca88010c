"""Continuation prompts for a base model (Gemma 3 270M) from our own committed corpus, nothing from a benchmark.

Each prompt is a request SmolLM2 wrote for itself (``user_texts`` of a corpus folder) followed by the
first tokens of SmolLM2's answer, as raw text for the base model to continue.

python docs/gemma3/make_prompts.py CORPUS_FOLDER NUM_PROMPTS ANSWER_TOKENS OUT.jsonl
"""

import json
import sys

from transformers import AutoTokenizer

from redrafter.distill import Corpus
from redrafter.files import write_jsonl
from redrafter.models import resolve_model_path

folder, count, answer_tokens, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
corpus = Corpus(folder)
smollm2 = AutoTokenizer.from_pretrained(resolve_model_path("default"))
rows = []
for user, (_, answer) in zip(corpus.user_texts(), corpus.conversations(), strict=True):
    start = smollm2.decode(answer[:answer_tokens], skip_special_tokens=True).strip()
    rows.append({"prompt": f"{user}\n\n{start}"})
    if len(rows) == count:
        break
write_jsonl(out, rows)
print(json.dumps({"prompts": len(rows), "from": folder, "example": rows[0]["prompt"]}))
