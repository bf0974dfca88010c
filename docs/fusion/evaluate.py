"""Held-out teacher-forced top-1 per draft step and simulated tokens/step of drafters, on the
conversations of given corpus folders (all of them: held out from every drafter compared here).

python runs/fusion/evaluate.py OUT.json CORPUS... -- DRAFTER...
A drafter with fused layers reads them from a features cache of layers 2 and 15; one without, the
first d columns of the same cache.
"""

import json
import sys
import tempfile

from redrafter.api import resolve_drafter
from redrafter.hidden_cache import HiddenStates
from redrafter.models import load_target
from redrafter.train import TrainConfig, Trainer, load_corpora

out_path, rest = sys.argv[1], sys.argv[2:]
split = rest.index("--")
folders, drafters = rest[:split], rest[split + 1 :]
pairs = load_corpora(folders)
target, _ = load_target("default")
d = target.config.hidden_size
features = HiddenStates("build/hidden-eval-" + "-".join(f.rstrip("/").split("-")[-1] for f in folders), pairs, target,
                        layers=(2, 15))
config = TrainConfig(heldout_every=1, batch_size=8, eval_positions=1024, autocast=False)
results = {"corpora": folders, "conversations": len(pairs), "drafters": {}}
for name in drafters:
    drafter = resolve_drafter(name, "default")
    width = drafter.feature_size

    class Reader(Trainer):
        def target_states(self, indices, ids, attention):
            return features.batch(indices)[..., :width]

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Reader(target, config, pairs, tmp, drafter=drafter, progress=False)
        results["drafters"][name] = trainer.evaluate()
    print(name, json.dumps(results["drafters"][name]), file=sys.stderr, flush=True)
with open(out_path, "w") as handle:
    json.dump(results, handle, indent=1)
