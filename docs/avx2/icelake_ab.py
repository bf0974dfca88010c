"""Does packing the float weights for oneDNN pay on a CPU whose oneDNN converts bfloat16 as it goes
(plain AVX-512)? One target forward of q tokens after 256 cached ones, its head included, packed and
not, interleaved (medians of 25): `python docs/avx2/icelake_ab.py`.

redrafter does not pack there (``quant.packs_linears``), so this script turns packing on by hand.
Rows up to 8 only: from 12 rows redrafter runs float32 GEMMs there instead."""

import time

import torch

from redrafter import quant
from redrafter.kv_cache import TreeKVCache
from redrafter.lean_decoder import forward_head, target_forward
from redrafter.models import load_target
from redrafter.tree import additive_mask

torch.set_num_threads(2)
quant.packs_linears = lambda device, dtype: torch.ops.mkldnn._is_mkldnn_bf16_supported()
target, _ = load_target("default", dtype=torch.bfloat16)
config = target.config
forwards = {"unpacked": target_forward(target), "packed": target_forward(target, packed=True)}
heads = {name: forward_head(forward) or target.get_output_embeddings() for name, forward in forwards.items()}
assert isinstance(heads["packed"], quant.PackedLinear)
prompt = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(0))
causal = additive_mask(torch.ones(256, 256, dtype=torch.bool).tril()[None], target.dtype)
with torch.inference_mode():
    caches = {name: TreeKVCache(config.num_hidden_layers, 1024) for name in forwards}
    for name, forward in forwards.items():
        forward(prompt, torch.arange(256)[None], causal, caches[name])
    for q in (1, 2, 4, 8):
        tokens, positions = torch.randint(0, 1000, (1, q)), torch.arange(256, 256 + q)[None]
        mask = torch.zeros(1, 1, q, 256 + q, dtype=target.dtype)
        times = {name: [] for name in forwards}
        for _ in range(25):
            for name, forward in forwards.items():
                start = time.perf_counter()
                hidden = forward(tokens, positions, mask, caches[name])
                heads[name](hidden[..., : config.hidden_size])
                times[name].append(1000 * (time.perf_counter() - start))
                caches[name].crop(-q)
        print(q, {name: round(sorted(t)[12], 2) for name, t in times.items()}, flush=True)
