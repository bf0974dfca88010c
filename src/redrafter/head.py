"""The target's output head on a CPU, for the logits that sampling draws from (``kernels/head.c``).

Greedy steps take their argmax from the file's own Q8_0 head (:class:`redrafter.quant.ArgmaxHead`)
and need the float head for only the few rows of it that head cannot rule out. A sampled step needs
every logit of every tree node, and PyTorch's bfloat16 product over the default model's 49,152 x 576
head took 4.3 ms for one row on a CPU without bfloat16 instructions: a step at temperature 1 cost half
again a greedy one.
:class:`BFloat16Head` reads the same bfloat16 weights in our kernel instead, at about the speed of
reading them, each logit a float32 sum in one fixed order rounded to bfloat16: the same for a row
alone or beside others, so a tree's nodes and a plain step draw from the same distribution.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .kernels import kernel_refusal, library


class BFloat16Head(nn.Module):
    """``[..., K]`` hidden states -> ``[..., N]`` logits ``x W^T`` for the bfloat16 weights ``W``
    ``[N, K]`` (held, not copied: a tied head stays tied), in ``x``'s dtype (bfloat16 or float32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        library()  # a RuntimeError where the kernels cannot run
        if not takes(weight):
            raise ValueError("the head kernel takes contiguous bfloat16 CPU weights [N, K] with K a multiple of 16")
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, (outputs, inputs) = x.reshape(-1, x.shape[-1]), self.weight.shape
        if rows.dtype not in (torch.float32, torch.bfloat16):
            rows = rows.float()
        rows = rows.contiguous()
        bf16 = rows.dtype == torch.bfloat16
        y = torch.empty(rows.shape[0], outputs, dtype=rows.dtype)
        status = library().bf16_head(
            rows.data_ptr(), bf16, rows.shape[0], inputs, self.weight.data_ptr(), outputs, bf16, y.data_ptr()
        )
        if status != 0:
            raise MemoryError("head: no memory for the activations in float32")
        return y.to(x.dtype).reshape(*x.shape[:-1], outputs)


def cpu_head(target: PreTrainedModel) -> BFloat16Head | None:
    """A :class:`BFloat16Head` for ``target``'s output head where the kernel runs it (a bfloat16 head
    without a bias on a CPU with our kernels), else None (the head's own product)."""
    head = target.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or getattr(head, "bias", None) is not None or not takes(weight):
        return None
    return BFloat16Head(weight.detach()) if kernel_refusal() is None else None


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel takes these head weights: contiguous bfloat16 ``[N, K]`` on the CPU, ``K`` a
    multiple of 16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and not weight.shape[1] % 16
    )
