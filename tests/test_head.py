"""The bfloat16 output head in our kernel (redrafter.head): PyTorch's product up to its summation order,
the same bits for a row alone or among others, and taken by the decode loop for a bfloat16 CPU target."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_target

from redrafter.decode import SpeculativeDecoder, no_draft
from redrafter.head import BFloat16Head, cpu_head
from redrafter.kernels import kernel_refusal

pytestmark = pytest.mark.skipif(kernel_refusal() is not None, reason=str(kernel_refusal()))


def test_the_logits_are_the_bfloat16_product_of_float32_sums_and_a_rows_own():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(304, 96, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, 9, 96, generator=generator).to(torch.bfloat16)
    head = BFloat16Head(weight)
    logits = head(x)
    exact = x.double() @ weight.double().T
    assert logits.shape == (2, 9, 304) and logits.dtype == torch.bfloat16
    assert torch.allclose(logits.double(), exact, rtol=2**-8, atol=1e-3)  # rounded once, to bfloat16
    assert (logits == exact.to(torch.bfloat16)).float().mean() > 0.95  # float32 sums: rarely a last bit off
    assert torch.allclose(head(x.float()).double(), exact, rtol=1e-5, atol=1e-4)  # float32 in, float32 out
    flat = x.reshape(18, 96)
    for start, stop in [(0, 1), (3, 4), (2, 9), (17, 18)]:  # rows blocked by 4 at other places
        assert torch.equal(head(flat[start:stop]), logits.reshape(18, 304)[start:stop])


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_an_output_gets_the_same_bits_summed_among_sixteen_or_alone(rows):
    """Sixteen outputs share one transposed reduction; the last N % 16 are summed one by one. An
    output's logit is the same either way: a head whose rows start 5 later moves the last five of 309
    outputs from the one-by-one path into a group of sixteen."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(309, 96, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=generator).to(torch.bfloat16)
    alone, grouped = BFloat16Head(weight)(x), BFloat16Head(weight[5:].contiguous())(x)
    assert torch.equal(alone[:, 304:], grouped[:, 299:])
    assert torch.equal(alone[:, 5:], grouped)


def test_the_decode_loop_takes_it_for_a_bfloat16_cpu_target_only():
    bf16 = tiny_target("llama", dtype=torch.bfloat16)
    decoder = SpeculativeDecoder(bf16, no_draft, [], lean=False)
    assert isinstance(decoder.head, BFloat16Head)
    assert decoder.head.weight.data_ptr() == bf16.get_output_embeddings().weight.data_ptr()  # not a copy
    assert cpu_head(tiny_target("llama", dtype=torch.float32)) is None
