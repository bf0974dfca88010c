"""The shipped drafter's teacher-forced top-1 at draft step 1 on the bfloat16 target's own greedy answers
to 16 MT-Bench prompts (2 a category, 128 tokens), from full-forward hidden states as in training, and
how its top probability predicts a hit (calibration).

    python docs/tried-32/drafter_top1.py
"""

import torch

from redrafter.api import ReDrafter
from redrafter.models import decoder_features
from redrafter.prompts import per_category, read_prompts

torch.manual_seed(0)
rd = ReDrafter.from_pretrained("default", weights="float", drafter_weights="float")
prompts = per_category(read_prompts("../shared/data/mt_bench.jsonl"), 2)
dr = rd.drafter
decoder = rd.target.model
correct = counted = 0
allp, allok, alll = [], [], []
c_first64 = n_first64 = 0
for p in prompts:
    ids = rd.encode(p.text)
    ans = rd.generate_ids([ids], max_new_tokens=128)[0].token_ids
    full = torch.tensor([ids + list(ans)])
    with torch.inference_mode():
        feats = decoder_features(decoder, dr.target_layers, input_ids=full, use_cache=False).float()
        T = full.shape[1]
        start = len(ids) - 1  # h_t at the prompt's last token predicts ans[0]; drafter: input ans[0], label ans[1]
        pos = torch.arange(start, T - 2)
        h = feats[0, pos][None]  # [1, P, d]
        inp = full[0, pos + 1][None, :, None]
        lab = full[0, pos + 2]
        logits = dr.float()(h, inp)[0, :, 0]
        pred = dr.to_target_ids(logits.argmax(-1))
        ok = pred == lab
        allp.append(logits.float().softmax(-1).max(-1).values)
        allok.append(ok)
        correct += int(ok.sum())
        counted += len(lab)
        c_first64 += int(ok[:63].sum())
        n_first64 += min(63, len(lab))
print(
    f"teacher-forced top-1 at draft step 1 on {len(prompts)} MT-Bench answers: {correct / counted:.3f}"
    f" ({counted} positions); first 64: {c_first64 / n_first64:.3f}"
)

p = torch.cat(allp)
ok = torch.cat(allok).float()
for lo, hi in [(0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 0.9), (0.9, 1.01)]:
    m = (p >= lo) & (p < hi)
    print(f"p in [{lo:.1f},{hi:.1f}): share {m.float().mean():.3f} accuracy {ok[m].mean():.3f}")
for t in [0.3, 0.5, 0.7]:
    m = p >= t
    print(f"p >= {t}: share {m.float().mean():.3f} accuracy {ok[m].mean():.3f}")
