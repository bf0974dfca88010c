"""The control arm of the fusion comparison: the same fine-tune as `redrafter train --init default
... --out runs/fusion/final` (no fused layers), reading the final hidden states from the fused run's
cache (its first d columns: the same bytes a final-only cache would hold), to skip a second 40-minute
cache build on one thread."""

import json
import sys
from pathlib import Path

from redrafter.api import resolve_drafter
from redrafter.hidden_cache import HiddenStates
from redrafter.models import load_target
from redrafter.train import TrainConfig, Trainer, load_corpora

C = "data/corpus/smollm2-135m-instruct"
pairs = load_corpora([f"{C}-seed9", f"{C}-openers-seed10"])
config = TrainConfig(
    steps=1500, batch_size=8, lr=5e-4, warmup=100, eval_every=750, checkpoint_every=250,
    heldout_every=25, position_fraction=0.25, draft_steps=4, seed=0,
)
target, _ = load_target("default")
fused = HiddenStates("build/hidden-fused-2-15", pairs, target, layers=(2, 15))
d = target.config.hidden_size


class FinalOnly(Trainer):
    def target_states(self, indices, ids, attention):
        return fused.batch(indices)[..., :d]


init = resolve_drafter("default", "default")
init.ngrams = None
out = Path("runs/fusion/final")
trainer = FinalOnly(target, config, pairs, out, drafter=init)
if (out / "checkpoint" / "state.pt").is_file():
    trainer.load_checkpoint()
trainer.train()
final = trainer.last_eval or trainer.evaluate()
(out / "heldout.json").write_text(json.dumps(final) + "\n")
print(json.dumps(final), file=sys.stderr)
