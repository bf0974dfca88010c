"""How far a tree forward's logits sit from one-token forwards' for the same tokens, per precision.

    python docs/w4a8/tree_vs_single.py float int4 w4a8

For the first 3 bundled prompts: after the prompt, the next 8 greedy tokens are run once as 8
one-token forwards and once as one 8-token forward (a chain: causal mask), and the largest difference
of any logit (float32 head over the bfloat16 hidden states) is taken per token. This is what decides
how large a top-2 gap rounding alone can flip between `ar` and `redrafter` (bench.NEAR_TIE).
"""

import json
import sys

import torch

from redrafter.bench import OWN_PROMPTS, additive_mask
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import target_forward
from redrafter.models import gguf_source, load_target
from redrafter.quant import quantize_target

CHAIN = 8
with torch.inference_mode():
    for weights in sys.argv[1:]:
        target, tokenizer = load_target("default", dtype=torch.bfloat16, device="cpu")
        quantize_target(target, weights, gguf_source("default"), dense_prefill=False)
        forward, head = target_forward(target), target.get_output_embeddings().weight.float()
        worst = []
        for line in json.loads("[" + ",".join(OWN_PROMPTS.read_text().splitlines()[:3]) + "]"):
            text = tokenizer.apply_chat_template([{"role": "user", "content": line["prompt"]}], tokenize=False)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            n = ids.shape[1]
            cache = TreeKVCache(target.config.num_hidden_layers, capacity=n + CHAIN + 1)
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
            hidden = forward(ids, torch.arange(n)[None], additive_mask(causal, torch.bfloat16), cache)
            tokens, single = [int((hidden[0, -1].float() @ head.T).argmax())], []
            for step in range(CHAIN):
                position = torch.tensor([[n + step]])
                mask = torch.zeros(1, 1, 1, n + step + 1, dtype=torch.bfloat16)
                logits = forward(torch.tensor([[tokens[-1]]]), position, mask, cache)[0, -1].float() @ head.T
                single.append(logits)
                tokens.append(int(logits.argmax()))
            cache.crop(-CHAIN)
            chain = torch.ones(CHAIN, n + CHAIN, dtype=torch.bool).tril(diagonal=n)[None]
            hidden = forward(
                torch.tensor([tokens[:CHAIN]]), torch.arange(n, n + CHAIN)[None], additive_mask(chain, torch.bfloat16), cache
            )
            tree = hidden[0].float() @ head.T
            worst += [float((tree[i] - single[i]).abs().max()) for i in range(CHAIN)]
        worst.sort()
        print(f"{weights}: largest logit difference per token, median {worst[len(worst) // 2]:.3f}, max {worst[-1]:.3f}")
