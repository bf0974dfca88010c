"""``redrafter bench-serve`` with every prefill and step of both engines logged to ``OUT/trace.json``.

Usage: ``python docs/serve/trace_serve.py bench-serve ... --out OUT``. Each entry: start time, engine
(numbered as their batches first ran: the warm-up's, then the adaptive server's, then the plain
one's), "add" or "step", rows before it, kind (a step) or rows joining (an add), seconds, and the
cache's length and capacity after it.
"""

import json
import sys
import time

from redrafter import cli, decode

LOG: list[tuple] = []
ENGINES: dict[int, int] = {}
step, add = decode.RunningBatch.step, decode.RunningBatch.add


def logged(method, what: str):
    def run(batch, *args):
        rows, start = batch.size, time.perf_counter()
        out = method(batch, *args)
        seconds = time.perf_counter() - start
        cache = (0, 0) if batch.rows is None else (batch.rows.cache.length, batch.rows.cache.layers[0].capacity)
        detail = int(args[0]) if what == "step" else len(args[0])
        LOG.append((start, ENGINES.setdefault(id(batch), len(ENGINES)), what, rows, detail, seconds, *cache))
        return out

    return run


decode.RunningBatch.step, decode.RunningBatch.add = logged(step, "step"), logged(add, "add")
try:
    cli.main(sys.argv[1:])
finally:
    with open(sys.argv[sys.argv.index("--out") + 1] + "/trace.json", "w") as file:
        json.dump(LOG, file)
