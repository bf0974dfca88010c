"""What a decode-loop step costs over B rows with k lookup nodes a row, against a plain step over the same
rows: B MT-Bench prompts (chat template) decoded together greedily, the whole step timed (drafting, the
tree forward, verification, the host's share), the settings interleaved within each round, each round
on the next B prompts. A confidence tree with flat costs and at most k nodes keeps k nodes in every row
that has them (a row with fewer is padded, as in any tree step).

    python docs/batch-tree/loop_cost.py 1,2,4,8,16 1,2,3,4 6 48 > docs/batch-tree/loop_cost.txt

Prints per B: ms a step for k = 0 (plain) and each k, and that over plain's.
"""

import statistics
import sys
import time

from redrafter.api import ReDrafter
from redrafter.decode import RunningBatch
from redrafter.prompts import per_category, read_prompts
from redrafter.sampling import SamplingParams, TokenChooser

rd = ReDrafter.from_pretrained()
decoder = rd.decoder
prompts_file = sys.argv[5] if len(sys.argv) > 5 else "../shared/data/mt_bench.jsonl"
texts = [p.text for p in read_prompts(prompts_file)]
if len(sys.argv) > 6:
    texts = [p.text for p in per_category(read_prompts(prompts_file), int(sys.argv[6]))]
batches = [int(x) for x in sys.argv[1].split(",")]
counts = [0] + [int(x) for x in sys.argv[2].split(",")]
rounds, new_tokens = int(sys.argv[3]), int(sys.argv[4])
for rows in batches:
    times: dict[int, list[float]] = {k: [] for k in counts}
    for r in range(rounds):
        prompts = [rd.encode(texts[(r * rows + i) % len(texts)]) for i in range(rows)]
        for k in counts if r % 2 else counts[::-1]:
            decoder.lookup_nodes, decoder.node_costs = max(k, 1), (1.0, 99.0) if k < 0 else (1.0,) * 16
            chooser = TokenChooser(decoder.target, SamplingParams(), decoder.argmax_head, decoder.head)
            batch = RunningBatch(decoder, chooser)
            batch.add(prompts, [new_tokens] * rows)
            steps = []
            while batch.size == rows:
                start = time.perf_counter()
                batch.step(1 if k else 0)
                steps.append(time.perf_counter() - start)
            times[k].append(statistics.median(steps[2:]))
    plain = statistics.median(times[0])
    line = {k: round(1000 * statistics.median(times[k]), 2) for k in counts}
    print(rows, line, [round(statistics.median(times[k]) / plain, 3) for k in counts], flush=True)
