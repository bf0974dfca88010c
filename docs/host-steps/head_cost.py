"""The default model's bfloat16 head (49,152 x 576) for 1, 4 and 8 rows: PyTorch's product against our
kernel's (``redrafter.head.BFloat16Head``), and what sampling then spends on the distribution
(``probabilities``) and the draw (``inverse_cdf``); best of three timings of 100 calls.

    python docs/host-steps/head_cost.py
"""

import time

import torch

from redrafter.api import ReDrafter
from redrafter.head import cpu_head
from redrafter.sampling import SamplingParams, inverse_cdf, probabilities

rd = ReDrafter.from_pretrained("default", drafter="none")
own, kernel = rd.target.get_output_embeddings(), cpu_head(rd.target)
params = SamplingParams(temperature=1.0)


def timed(function, calls: int = 100) -> float:
    for _ in range(5):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls * 1e6


with torch.inference_mode():
    for rows in (1, 4, 8):
        hidden = torch.randn(1, rows, 576, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        logits = kernel(hidden)
        probs = probabilities(logits, params)
        uniform = torch.rand(1, rows, dtype=torch.float64)
        times = [
            min(timed(function) for _ in range(3))
            for function in (
                lambda: own(hidden),  # noqa: B023
                lambda: kernel(hidden),  # noqa: B023
                lambda: probabilities(logits, params),  # noqa: B023
                lambda: inverse_cdf(probs, uniform),  # noqa: B023
            )
        ]
        print(
            "rows {}: PyTorch's head {:.0f} us, ours {:.0f} us, probabilities {:.0f} us, draw {:.0f} us".format(
                rows, *times
            )
        )
