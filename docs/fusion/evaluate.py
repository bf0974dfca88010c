"""Held-out teacher-forced top-1 per draft step and simulated tokens/step of drafters, on the
conversations of given corpus folders (all of them: held out from every drafter compared here).

python runs/fusion/evaluate.py OUT.json CORPUS... -- DRAFTER...
A drafter with fused layers reads them from a features cache of layers 2 and 15; one without, the
first d columns of the same cache.
"""

import json
import sys

from redrafter.api import resolve_drafter
from redrafter.hidden_cache import HiddenStates
from redrafter.models import load_target
from redrafter.train import TrainConfig, evaluate_drafter, load_corpora

out_path, rest = sys.argv[1], sys.argv[2:]
split = rest.index("--")
folders, drafters = rest[:split], rest[split + 1 :]
pairs = load_corpora(folders)
target, _ = load_target("default")
d = target.config.hidden_size
features = HiddenStates("build/hidden-eval-" + "-".join(f.rstrip("/").split("-")[-1] for f in folders), pairs, target,
                        layers=(2, 15))
config = TrainConfig(batch_size=8, eval_positions=1024)
results = {"corpora": folders, "conversations": len(pairs), "drafters": {}}
for name in drafters:
    drafter = resolve_drafter(name, "default").float()
    drafter.attach(target.get_input_embeddings(), target.get_output_embeddings())
    width = drafter.feature_size

    def states(indices, ids, attention, width=width):
        return features.batch(indices)[..., :width]

    results["drafters"][name] = evaluate_drafter(drafter, pairs, states, config)
    print(name, json.dumps(results["drafters"][name]), file=sys.stderr, flush=True)
with open(out_path, "w") as handle:
    json.dump(results, handle, indent=1)
