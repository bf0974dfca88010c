"""bench-serve with every prefill and step of both engines logged (time, engine, what, rows, kind, seconds)."""

import json
import sys
import time

from redrafter import cli, decode

LOG = []
order = {}
orig_step, orig_add = decode.RunningBatch.step, decode.RunningBatch.add


def step(self, kind=1):
    size, t = self.size, time.perf_counter()
    out = orig_step(self, kind)
    LOG.append(
        (
            t,
            order.setdefault(id(self), len(order)),
            "step",
            size,
            int(kind),
            time.perf_counter() - t,
            self.rows.cache.length if self.rows is not None else 0,
            self.rows.cache.layers[0].capacity if self.rows is not None else 0,
        )
    )
    return out


def add(self, prompts, budgets):
    size, t = self.size, time.perf_counter()
    out = orig_add(self, prompts, budgets)
    LOG.append(
        (
            t,
            order.setdefault(id(self), len(order)),
            "add",
            size,
            len(prompts),
            time.perf_counter() - t,
            self.rows.cache.length if self.rows is not None else 0,
            self.rows.cache.layers[0].capacity if self.rows is not None else 0,
        )
    )
    return out


decode.RunningBatch.step, decode.RunningBatch.add = step, add
try:
    cli.main(sys.argv[1:])
finally:
    json.dump(LOG, open(sys.argv[sys.argv.index("--out") + 1] + "/trace.json", "w"))
