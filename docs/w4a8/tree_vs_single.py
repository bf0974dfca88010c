"""How far a chain forward's logits sit from one-token forwards' for the same tokens, per precision,
with the decode steps' attention through SDPA and through redrafter.attention.invariant_attention.

    python docs/w4a8/tree_vs_single.py float int4 w4a8

The first Spec-Bench prompt: 40 greedy tokens decoded one at a time after it; then, for chains of
2 to 8 tokens starting every third token, the cache is rebuilt as plain decoding has it and the chain
runs as one forward (a causal mask). Printed: the largest difference of any logit (float32 head over
the bfloat16 hidden states) over all chain tokens. Zero means the tree forward gives each token the
bits a one-token forward gives, so speculative decoding cannot part from plain decoding.
"""

import json
import sys

import torch

from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target
from redrafter.tree import additive_mask

PROMPT = json.loads(open("../shared/data/spec_bench.jsonl").readline())["turns"][0]


def one_token(forward, token: int, position: int, cache: TreeKVCache) -> torch.Tensor:
    mask = torch.zeros(1, 1, 1, position + 1, dtype=torch.bfloat16)
    return forward(torch.tensor([[token]]), torch.tensor([[position]]), mask, cache)[0, -1]


with torch.inference_mode():
    for weights in sys.argv[1:]:
        target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
        quantize_target(target, weights, gguf_source("default"), dense_prefill=False)
        forward, head = target_forward(target), target.get_output_embeddings().weight.float()
        chat = [{"role": "user", "content": PROMPT}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        n = ids.shape[1]
        for attention in ("sdpa", "invariant"):
            lean = getattr(forward, "lean", forward)  # a packed forward runs the lean decoder
            lean.invariant_steps = attention == "invariant"
            cache = TreeKVCache(target.config.num_hidden_layers, capacity=n + 48)
            causal = additive_mask(torch.ones(1, n, n, dtype=torch.bool).tril(), torch.bfloat16)
            hidden = forward(ids, torch.arange(n)[None], causal, cache)
            tokens, single = [int((hidden[0, -1].float() @ head.T).argmax())], []
            for step in range(40):
                single.append(one_token(forward, tokens[-1], n + step, cache).float() @ head.T)
                tokens.append(int(single[-1].argmax()))
            worst = {}
            for size in (2, 4, 8):
                worst[size] = 0.0
                for start in range(0, 40 - size, 3):
                    cache.crop(n - cache.length)
                    for step in range(start):  # the cache as plain decoding has it
                        one_token(forward, tokens[step], n + step, cache)
                    cached = torch.ones(size, n + start, dtype=torch.bool)
                    allowed = torch.cat([cached, torch.ones(size, size, dtype=torch.bool).tril()], 1)
                    chain = (
                        forward(
                            torch.tensor([tokens[start : start + size]]),
                            torch.arange(n + start, n + start + size)[None],
                            additive_mask(allowed[None], torch.bfloat16),
                            cache,
                        )[0].float()
                        @ head.T
                    )
                    gaps = [float((chain[i] - single[start + i]).abs().max()) for i in range(size)]
                    worst[size] = max(worst[size], *gaps)
            chains = "  ".join(f"chain {size}: {gap:.4f}" for size, gap in worst.items())
            print(f"{weights:5s} {attention:9s} {chains}", flush=True)
