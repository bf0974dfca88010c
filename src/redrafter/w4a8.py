"""Quantized weights times int8 activations on AVX-512 VNNI: the arithmetic llama.cpp runs a Q4 GGUF with.

PyTorch's int4 kernel (``--weights int4``) converts every 4-bit weight to float and multiplies it with
bfloat16 activations, once per row: a tree of 16 tokens costs about four single-token forwards. llama.cpp
instead quantizes each row of activations to int8 per block of 32 inputs and multiplies integers,
64 products per instruction with AVX-512 VNNI, so extra rows cost little. :class:`W4A8Linear` does the
same (``--weights w4a8``), in a small C kernel (``kernels/w4a8.c``) compiled on first use:

- the weights are a GGUF tensor's own codes, ``w = d u + m`` per block of 32 (Q4_1: ``d``, ``m``;
  Q4_0: ``m = -8 d``; a Q8_0 head: ``u = q + 128``, ``m = -128 d``), with ``d`` and ``m`` kept in
  float16 as the file stores them, so nothing is rounded; other tensors are quantized Q4_1-style;
- each row's activations become ``a = round(x / s)``, ``s = max |x| / 127`` per block (the rounding
  this precision adds over ``int4``'s bfloat16 activations, as llama.cpp's);
- a block adds ``s (d sum(u a) + m sum(a))``: the integer sum exact, the rest float32 in one fixed
  order, so each row's output is the same whatever other rows share the product (batch invariance:
  trees, batches and single tokens agree bit for bit, and speculative decoding stays lossless).

It runs on x86-64 CPUs with AVX-512 VNNI (Ice Lake and later Xeons, Zen 4) where a C compiler is
found (:mod:`redrafter.kernels` builds it; :func:`~redrafter.kernels.kernel_refusal` says why not
elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import library

TILE = 16  # outputs per tile of the codes' layout
BLOCK = 32  # inputs per block (one d and m)
EXACT_KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # w4a8_argmax's exact weights


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[N, K]`` codes (uint8, ``< 2**bits``) -> the kernel's tile-major bytes (``kernels/w4a8.c``)."""
    rows, columns = codes.shape
    if bits == 8:  # tile, lane, block, step, byte -> tile, block, step, lane, byte
        return codes.reshape(rows // TILE, TILE, columns // BLOCK, 8, 4).permute(0, 2, 3, 1, 4).contiguous().flatten()
    # tile, lane, block, chunk, nibble, byte -> tile, block, chunk, lane, byte, nibble
    split = codes.reshape(rows // TILE, TILE, columns // BLOCK, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    return (split[..., 0] | (split[..., 1] << 4)).contiguous().flatten()


def pack_scales(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[N, K / 32]`` float ``d`` and ``m`` -> float16 ``[N / 16, K / 32, 2, 16]`` (rounded to float16)."""
    rows, blocks = d.shape
    both = torch.stack([d, m]).to(torch.float16).reshape(2, rows // TILE, TILE, blocks)
    return both.permute(1, 3, 0, 2).contiguous()


class W4A8Linear(nn.Module):
    """``y = x W^T + b`` with ``W = d u + m`` per block of 32 inputs, through the kernel above.

    Args:
        codes: ``[N, K]`` uint8 codes ``u`` (``N`` a multiple of 16, ``K`` of 32).
        d, m: ``[N, K / 32]`` float scales and offsets (stored as float16).
        bits: 4 (codes 0..15, stored two to a byte) or 8.
        bias: ``[N]`` or None.
        dtype: the activations' dtype; the output has it too.
    """

    def __init__(
        self,
        codes: torch.Tensor,
        d: torch.Tensor,
        m: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        library()  # a RuntimeError where the kernels cannot run
        self.out_features, self.in_features = codes.shape
        if self.out_features % TILE or self.in_features % BLOCK or bits not in (4, 8):
            raise ValueError(f"w4a8 packs [N, K] codes of 4 or 8 bits with N a multiple of {TILE} and K of {BLOCK}")
        self.bits, self.dtype = bits, dtype
        self.register_buffer("codes", pack_codes(codes, bits))
        self.register_buffer("scales", pack_scales(d.float(), m.float()))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def fused(cls, parts: list[W4A8Linear], bias: torch.Tensor | None) -> W4A8Linear:
        """One layer computing ``parts``' outputs side by side, with ``bias`` ``[sum N]`` or None (the
        layout is tile-major, so the codes stack as they are); the parts then hold views of its buffers."""
        if len({(part.in_features, part.bits, part.dtype) for part in parts}) != 1:
            raise ValueError("w4a8 layers fuse only with the same inputs, code width and dtype")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.bits, fused.dtype = parts[0].in_features, parts[0].bits, parts[0].dtype
        fused.out_features = sum(part.out_features for part in parts)
        fused.register_buffer("codes", torch.cat([part.codes for part in parts]))
        fused.register_buffer("scales", torch.cat([part.scales for part in parts]))
        fused.register_buffer("bias", bias)
        sizes, tiles = [part.codes.numel() for part in parts], [part.out_features // TILE for part in parts]
        for part, codes, scales in zip(parts, fused.codes.split(sizes), fused.scales.split(tiles), strict=True):
            part.codes, part.scales = codes, scales
        return fused

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> the kernel's input ``[M, K]``: contiguous float32 or bfloat16."""
        flat = x.reshape(-1, self.in_features)
        if flat.dtype not in (torch.float32, torch.bfloat16):
            flat = flat.float()
        return flat.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``."""
        flat = self._rows(x)
        out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)  # written in x's dtype by the kernel
        status = library().w4a8_matmul(
            flat.data_ptr(), flat.dtype == torch.bfloat16, flat.shape[0], self.in_features,
            self.codes.data_ptr(), self.scales.data_ptr(), self.bits, self.out_features, out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("w4a8: no memory for the quantized activations")
        y = out.to(x.dtype)  # a float16 input ran in float32
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def argmax(self, x: torch.Tensor, exact: torch.Tensor, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The greedy argmax of a head, certified: ``[..., K]`` -> ``ids [...]`` and ``checked [...]``.

        ``ids``: per row, the column of the largest ``x . exact[n]``, each a float32 sum in one fixed
        order (for bfloat16 ``exact``, :class:`~redrafter.head.BFloat16Head`'s logits in float32), the
        lower column among equals. This layer's outputs (the screen) only decide which of them to
        compute: ``bounds`` ``[2, N]`` (:func:`argmax_bounds`) bound how far a screen output can be
        from its exact logit, and every column whose screen output is not provably beaten is computed
        exactly (``checked``: how many per row; see ``kernels/w4a8.c``). A layer without a bias
        (a head), ``exact`` ``[N, K]`` bfloat16, float16 or float32."""
        if self.bias is not None or exact.shape != (self.out_features, self.in_features):
            raise ValueError("w4a8 certifies the argmax of a layer without a bias, with exact weights of its shape")
        flat = self._rows(x)
        exact, bounds = exact.contiguous(), bounds.contiguous()
        ids = torch.empty(flat.shape[0], dtype=torch.long)
        checked = torch.empty(flat.shape[0], dtype=torch.long)
        status = library().w4a8_argmax(
            flat.data_ptr(), flat.dtype == torch.bfloat16, flat.shape[0], self.in_features,
            self.codes.data_ptr(), self.scales.data_ptr(), self.bits, self.out_features,
            exact.data_ptr(), EXACT_KINDS[exact.dtype], bounds[0].data_ptr(), bounds[1].data_ptr(),
            ids.data_ptr(), checked.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("w4a8: no memory for the quantized activations")
        return ids.reshape(x.shape[:-1]), checked.reshape(x.shape[:-1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def argmax_bounds(exact: torch.Tensor, screen: torch.Tensor) -> torch.Tensor:
    """``[2, N]`` float32 bounds for :meth:`W4A8Linear.argmax`: per output row, ``|exact - screen|``
    and ``|screen|`` (Euclidean norms over ``K``, computed in float64 and rounded up), from the exact
    weights ``[N, K]`` and the screen layer's own weights ``[N, K]`` (float64: ``d u + m`` with its
    float16 ``d`` and ``m``)."""
    gap = (exact.double() - screen).norm(dim=1)
    norm = screen.norm(dim=1)
    return (torch.stack([gap, norm]) * (1 + 2**-20)).float()
