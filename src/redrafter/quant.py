"""Weight-only quantized target: its linear layers at 4 or 8 bits, activations in the compute dtype.

A CPU forward of a small model is bound by reading its weights, so fewer bits per weight make every
forward cheaper. Two of PyTorch's CPU kernels do the work:

- **int4** (``aten._weight_int4pack_mm_for_cpu``): groups of ``G = 32`` consecutive inputs of an
  output row share a scale and a zero, ``w = (q - 8) * scale + zero`` with codes ``q`` in 0..15.
  A GGUF tensor stored as Q4_1 (``w = d q + m`` per block of 32) maps onto this with
  ``scale = d``, ``zero = m + 8 d``; Q4_0 (``w = d (q - 8)``) with ``scale = d``, ``zero = 0``. So
  the codes run are the file's own. The one rounding is of the scales and zeros: the kernel wants
  them in the activations' dtype. In float32 ``d`` (a float16) is exact and ``m + 8 d`` is rounded
  once (exact unless ``m`` and ``d`` are 2^13 apart); in bfloat16 both keep 8 significant bits, a
  relative error of at most 2^-9 per scale, the same rounding a bfloat16 copy of the weights has.
  Any other tensor (another GGUF type, a Hugging Face folder) is quantized from its weights in the
  same form, Q4_1-style: per group, ``scale = (max - min) / 15`` and codes ``round((w - min) / scale)``.
- **w4a8** (:class:`~redrafter.w4a8.W4A8Linear`, our AVX-512 VNNI kernel): int4's codes with
  ``d`` and ``m`` in float16 as a GGUF stores them, times activations rounded to int8 per block of
  32, as llama.cpp computes a Q4 GGUF; extra rows cost little, so trees do (see :mod:`redrafter.w4a8`).
- **int8** (``aten._weight_int8pack_mm``): one scale per output row, symmetric,
  ``scale = max |w| / 127``, codes ``round(w / scale)``: always quantized from the weights (GGUF's
  Q8_0 has one scale per 32 weights, which this kernel cannot hold).

**Prefills on dequantized copies.** The int4 kernel dequantizes as it multiplies, so it turns
compute-bound as rows grow: a prompt's prefill of the default model took twice as long as ``F.linear``
in float32 on the same weights (700 rows, Ice Lake Xeon). :func:`quantize_target` therefore also keeps
an int4 target's weights dequantized (:attr:`Int4Linear.dense`, for a bfloat16 or float16 target:
in float32 where bfloat16 products lack instructions, else in its dtype), and the lean forward runs
prefills of at least ``lean_decoder.DENSE_PREFILL_MIN_ROWS`` tokens on them. Decode steps never do,
so every step of a row still gets the kernel's bits whatever the tree, and plain and speculative
decoding prefill alike.

Only the linear layers inside the decoder are quantized. Embeddings, norms and the output head
stay in the compute dtype: the head's rows are also what exact argmax and a tied drafter head read.

**The head for the argmax's candidates** (:class:`ArgmaxHead`). Greedy decoding picks the best of a
few candidate tokens recomputed in float32 (:func:`redrafter.sampling.exact_argmax`); the candidates
only need logits about as close as bfloat16's. Through the w4a8 kernel the head certifies the argmax
instead (:meth:`ArgmaxHead.argmax`): every token it cannot rule out by a bound on its error is
recomputed, so none can be missed. Over one to a few rows a bfloat16 head is bound by
reading its ``[V, d]`` weights (56 MiB for the default model, a third of an int4 step). Where the
GGUF file stores the head (or the tied embedding) as Q8_0, ``w = d q`` with ``q`` int8 per block of
32, the int4 kernel reads it at half the bytes: ``q + 128 = 16 h + l`` with ``h, l`` in 0..15, so
``w = 16 d (h - 8) + d l``: the codes ``h`` (scale ``16 d``, zero 0) and ``l`` (scale ``d``, zero
``8 d``) over the input written twice, one product. The one rounding is ``d`` to the activations'
dtype (8 significant bits in bfloat16; the bfloat16 head rounds each ``d q`` instead). A Q4_0 or Q4_1
head is read as its own int4 codes. Sampling and the float32 recomputation keep the float head.

**Float32 GEMMs for bfloat16 weights on CPUs without bfloat16 instructions.** Where the CPU has no
native bfloat16 (float16) matrix instructions (x86 without AVX-512 BF16 or AMX: most laptops, AMD
Zen 2 and 3, Skylake to Ice Lake Xeons), PyTorch's bfloat16 GEMM converts as it goes and ran at 0.8
GFLOP/s on a 2-core AVX2 machine, against 100 for float32: a 17-token tree forward of the default
model took 8x a one-token one, and a 256-token prefill 3.7 to 5 s. A one-token product is bound by
reading the weights and stays in bfloat16 (half the bytes); a product over at least
:data:`FLOAT32_GEMM_MIN_ROWS` rows (a tree, a prompt's prefill, many batch rows) runs as float32
GEMM on a float32 copy of the weights, its output rounded back to bfloat16
(:class:`Float32GemmLinear`). The arithmetic is the bfloat16 layer's (float32 products and sums of
the same bfloat16 values, rounded once), up to summation order; the copy costs twice the bfloat16
weights' memory. :func:`quantize_target` does this by itself where it pays
(:func:`lacks_half_gemm`): the decoder's linear layers with float weights, and the output head with
any weights. Where oneDNN converts bfloat16 as it goes (plain AVX-512, :func:`converts_bf16`), even two
rows pay: the products of one forward of the default model over 2 rows took 26.1 ms in float32 against
36.7 in bfloat16 (Ice Lake Xeon, 2 threads, ``docs/avx2/products.py``; one row: 25.0 against 21.6), so
there float32 GEMMs start at :data:`FLOAT32_GEMM_MIN_ROWS_CONVERTING` rows.

**Weights packed once for oneDNN** (:class:`PackedLinear`). Where oneDNN has native bfloat16
(float16) products (AVX-512 BF16, AMX), PyTorch's ``F.linear`` reorders the weight into oneDNN's
blocked layout on every call: for the small products of a decode step that reorder reads and writes
the whole weight again, and costs as much as the product. The lean forward
(:mod:`redrafter.lean_decoder`) can instead keep each of its layers' weights reordered once
(``torch.ops.mkldnn._reorder_linear_weight``) and call oneDNN's product on them
(``mkldnn._linear_pointwise``), as Inductor's frozen CPU graphs do. On the development machine (Intel
Xeon with AMX, 2 threads) this made the default model's products 1.2 to 2x faster over 1 to 128 rows,
with results equal to ``F.linear``'s bit for bit there; over more rows (a long prompt's prefill) the
reorder is a small share and ``F.linear`` runs. The reordered copy costs the layers' float weights'
memory once more (the model's own modules keep theirs). Where oneDNN converts bfloat16 as it goes, the
float32 copies of :class:`Float32GemmLinear` are reordered instead (float32 GEMM repacks its weight on
every call too), for products of :data:`FLOAT32_PACKED_MIN_ROWS` to :data:`PACKED_MAX_ROWS` rows: on
an Ice Lake Xeon (2 threads) a forward of the default model of 8 tokens took 56.3 ms against 73.4 (12:
64.7 against 92.3, 32: 96.0 against 99.8; ``docs/avx2/cost_curve.py --packed``).

The drafter can run quantized too (:func:`quantize_drafter`, ``--drafter-weights``), from its own
weights in the same forms (its tied vocabulary rows included): a draft step reads its weights three
times per tree, and what it drafts is verified by the target, so output never depends on it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .drafter import RecurrentDrafter
from .errors import RedrafterError
from .kernels import kernel_refusal
from .w4a8 import W4A8Linear, argmax_bounds

WEIGHTS = ("float", "int8", "int4", "w4a8")
# Precisions whose weights are int4 codes with a scale and a zero per group of 32 (a Q4 GGUF's own).
INT4_CODES = ("int4", "w4a8")
GROUP_SIZE = 32
# Packed int4 codes are laid out in blocks of output rows; a multiple of every block size in use.
INT4_FUSE_ROWS = 64
# GGUF types whose blocks are exactly int4 groups of 32 (a scale, and a minimum for Q4_1).
GGUF_INT4_TYPES = ("Q4_0", "Q4_1")
# Rows (batch rows x tree tokens) up to which :class:`ArgmaxHead` reads the int4 head; over more, the
# float head's GEMM is faster (Intel Xeon with AMX, 2 threads: 3.9 against 9.6 ms at one row, 5.5
# against 8.3 at four, 10.4 against 8.2 at eight, for the default model's Q8_0 head).
ARGMAX_HEAD_MAX_ROWS = 4
# The same for the w4a8 kernel's head, whose extra rows cost little (int8 products).
W4A8_ARGMAX_HEAD_MAX_ROWS = 64
# Products over at least this many rows run as float32 GEMMs where the CPU lacks bfloat16 ones: on a
# 2-core AVX2 machine a forward of the default model cost the same both ways at about 10 tokens.
FLOAT32_GEMM_MIN_ROWS = 12
# The same where oneDNN converts bfloat16 as it goes (converts_bf16: plain AVX-512), from two rows: the
# products of one forward of the default model over 2, 4 and 8 rows took 26.1, 42.7 and 55.5 ms in
# float32 against 36.7, 53.1 and 70.6 in bfloat16 on an Ice Lake Xeon (2 threads, docs/avx2/products.py).
FLOAT32_GEMM_MIN_ROWS_CONVERTING = 2
# Rows up to which :class:`PackedLinear` runs oneDNN's product on its reordered weight, and the row
# count oneDNN chooses that layout for. Measured on an Intel Xeon with AMX (2 threads, the default
# model's layers): 1.2 to 2x faster than ``F.linear`` from 1 to 128 rows, equal bit for bit there;
# at 512 to 2048 rows about as fast, and at 300 rows no longer equal bit for bit.
PACKED_MAX_ROWS = 128
PACKED_LAYOUT_ROWS = 16
# Rows from which :class:`PackedLinear` runs a Float32GemmLinear's reordered float32 copy: on an Ice Lake
# Xeon (2 threads, the default model's products, docs/avx2/products.py) 32.3 against 42.7 ms at 4 rows,
# but 30.7 against 27.7 at 3 and 30.7 against 26.1 at 2, where the float32 GEMM as it is runs faster.
FLOAT32_PACKED_MIN_ROWS = 4


class QuantizationError(RedrafterError):
    """A target that cannot run with the asked weight precision."""


@dataclass
class Int4Weight:
    """An ``[N, K]`` weight as int4 codes with one scale and zero per group of ``G`` inputs.

    Attributes:
        codes: ``[N, K]`` uint8 in 0..15.
        scale: ``[N, K // G]`` float32.
        zero: ``[N, K // G]`` float32, the value of code 8.
        minimum: ``[N, K // G]`` float32, the value of code 0 (``zero - 8 scale`` before ``zero`` was
            rounded): what :func:`w4a8_linear` stores.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    minimum: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        """``[N, K]`` float32 weights ``(q - 8) * scale + zero``."""
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero.repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - 8) * scale + zero

    def rows(self, index: torch.Tensor) -> Int4Weight:
        """The output rows ``index`` (a permutation or a subset), as a new weight."""
        return Int4Weight(self.codes[index], self.scale[index], self.zero[index], self.minimum[index])


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
    """``[N, K]`` float weights -> min-max int4 codes per group of ``group_size`` inputs (Q4_1's form)."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((groups - low[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(codes.reshape(out_features, in_features), scale, low + 8 * scale, low)


def gguf_int4(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Weight:
    """A GGUF Q4_0/Q4_1 tensor's raw blocks (``[N, K / 32 * bytes per block]`` uint8, as
    ``gguf.GGUFReader`` maps them) -> its own codes, scales and zeros, shape ``[N, K]``.

    A block is ``d`` (float16), for Q4_1 ``m`` (float16), then 16 bytes: element ``j`` of the
    block is the low nibble of byte ``j`` for ``j < 16`` and the high nibble of byte ``j - 16`` after.
    """
    out_features, in_features = shape
    header = {"Q4_0": 2, "Q4_1": 4}[type_name]
    blocks = np.ascontiguousarray(data).reshape(out_features, in_features // GROUP_SIZE, header + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., header:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(out_features, in_features)
    scale = torch.from_numpy(d)
    if type_name == "Q4_1":
        minimum = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        zero = minimum + 8 * scale
    else:
        zero, minimum = torch.zeros_like(scale), -8 * scale
    return Int4Weight(torch.from_numpy(codes.astype(np.uint8)), scale, zero, minimum)


def gguf_q8_0(data: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q8_0 tensor's raw blocks (``[N, K / 32 * 34]`` uint8) -> its codes shifted to unsigned,
    ``q + 128`` (``[N, K]`` uint8), and ``d`` (``[N, K / 32]`` float32): ``w = d (u - 128)``.

    A block is ``d`` (float16), then 32 int8 values ``q``.
    """
    out_features, in_features = shape
    blocks = np.ascontiguousarray(data).reshape(out_features, in_features // GROUP_SIZE, 2 + GROUP_SIZE)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    shifted = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return torch.from_numpy(shifted.reshape(out_features, in_features)), d


def gguf_q8_0_as_int4(data: np.ndarray, shape: tuple[int, int]) -> Int4Weight:
    """A GGUF Q8_0 tensor's raw blocks (``[N, K / 32 * 34]`` uint8) -> int4 codes over the input
    written twice, ``[N, 2 K]``: the high nibbles of ``q + 128`` (scale ``16 d``), then the low ones
    (scale ``d``, zero ``8 d``), so that ``x W^T = [x, x] W2^T`` for the file's ``W = d q``."""
    shifted, d = gguf_q8_0(data, shape)
    codes = torch.cat([shifted >> 4, shifted & 0x0F], dim=1)
    scale = torch.cat([16 * d, d], dim=1)
    zero = torch.cat([torch.zeros_like(d), 8 * d], dim=1)
    return Int4Weight(codes, scale, zero, zero - 8 * scale)


def _on_cpu(device: torch.device | str) -> bool:
    return str(device).partition(":")[0] == "cpu"


def quantization_refusal(device: torch.device | str, dtype: torch.dtype, what: str) -> str | None:
    """Why ``what`` (int8, int4) weights cannot run on ``device`` in ``dtype``, or None if they can."""
    if not _on_cpu(device):
        return f"{what} weights run on PyTorch's CPU kernels; device {device} is not supported"
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"{what} weights need --dtype bfloat16, float16 or float32, not {dtype}"
    refusal = kernel_refusal() if what == "w4a8" else None
    return None if refusal is None else f"w4a8 weights: {refusal}"


def check_quantizable(device: torch.device | str, dtype: torch.dtype, what: str) -> None:
    """Raise :class:`QuantizationError` unless ``what`` (int8, int4) weights run on ``device`` in ``dtype``."""
    refusal = quantization_refusal(device, dtype, what)
    if refusal is not None:
        raise QuantizationError(refusal)


class Int4Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as packed int4 codes and per-group scales and zeros.

    Args:
        weight: the codes, scales and zeros (``[N, K]``, ``N`` a multiple of 16).
        bias: ``[N]`` or None.
        dtype: the activations' dtype (the scales and zeros are stored in it).
        dense_dtype: also keep ``W`` dequantized in this dtype (``dense``, for :meth:`dense_product`:
            a prompt's prefill, see :class:`Int4Dense`), or None.
    """

    def __init__(
        self, weight: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype, dense_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_quantizable(torch.device("cpu"), dtype, "int4")
        self.out_features, self.in_features = weight.codes.shape
        self.group_size = weight.group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 2)
        scales_and_zeros = torch.stack([weight.scale.T, weight.zero.T], dim=-1)  # [K // G, N, 2]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        dense = None
        if dense_dtype is not None:  # the values the kernel runs: its scales and zeros are rounded to dtype
            scale, zero = weight.scale.to(dtype).float(), weight.zero.to(dtype).float()
            rounded = Int4Weight(weight.codes, scale, zero, zero - 8 * scale)
            dense = rounded.dequantize().to(dense_dtype)
        self.register_buffer("dense", dense)

    def dense_product(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]`` through ``F.linear`` on the dequantized weights (``dense``),
        in their dtype, the output rounded to ``x``'s."""
        bias = None if self.bias is None else self.bias.to(self.dense.dtype)
        return nn.functional.linear(x.to(self.dense.dtype), self.dense, bias).to(x.dtype)

    @classmethod
    def fused(cls, parts: list[Int4Linear]) -> Int4Linear:
        """One layer computing ``parts``' outputs side by side. The parts then hold views of its
        codes; their scale tables are copied back.

        The packed codes come in blocks of output rows (32 on AVX-512 machines), so stacking them
        is only sound when every part's outputs are a multiple of :data:`INT4_FUSE_ROWS`;
        otherwise a :class:`ValueError`.
        """
        if any(part.out_features % INT4_FUSE_ROWS for part in parts):
            raise ValueError(f"int4 layers fuse only with outputs a multiple of {INT4_FUSE_ROWS}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.group_size = parts[0].in_features, parts[0].group_size
        fused.out_features = sum(part.out_features for part in parts)
        fused.register_buffer("packed", torch.cat([part.packed for part in parts]))
        fused.register_buffer("scales_and_zeros", torch.cat([part.scales_and_zeros for part in parts], dim=1))
        fused.register_buffer("bias", fused_bias(parts))
        kept = [part.dense for part in parts]
        fused.register_buffer("dense", None if any(values is None for values in kept) else torch.cat(kept))
        sizes = [part.out_features for part in parts]
        views = [None] * len(parts) if fused.dense is None else fused.dense.split(sizes)
        for part, codes, tables, values in zip(
            parts, fused.packed.split(sizes), fused.scales_and_zeros.split(sizes, dim=1), views, strict=True
        ):
            part.packed, part.scales_and_zeros, part.dense = codes, tables.contiguous(), values
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``."""
        flat = x.reshape(-1, self.in_features).contiguous()  # an expanded input reshapes to a strided view
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int4Dense(nn.Module):
    """An :class:`Int4Linear`'s product through its dequantized weights (:meth:`Int4Linear.dense_product`):
    what a prompt's prefill runs (see :func:`quantize_target`)."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.dense_product(x)


def w4a8_linear(weight: Int4Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> W4A8Linear:
    """``weight``'s codes through the w4a8 kernel: ``w = d q + m`` with ``d = scale`` and ``m = minimum``,
    both rounded to float16: exact for a GGUF's Q4_1 blocks, which store them so, and for Q4_0 blocks
    (``m = -8 d``) whose ``|d|`` is below 8188; a :class:`QuantizationError` where ``m`` overflows."""
    if not torch.isfinite(weight.minimum.to(torch.float16)).all():
        raise QuantizationError("w4a8 keeps each block's minimum in float16, and this weight's overflow it")
    return W4A8Linear(weight.codes, weight.scale, weight.minimum, 4, bias, dtype)


def has_dense(module: nn.Module) -> bool:
    """Whether ``module`` is an :class:`Int4Linear` that keeps its dequantized weights."""
    return isinstance(module, Int4Linear) and module.dense is not None


class ArgmaxHead(nn.Module):
    """The target's head over the file's own 4-bit or Q8_0 values, for the greedy argmax (see the
    module docstring): ``[..., d]`` hidden -> ``[..., V]`` logits, close to the float head's.
    :func:`gguf_argmax_head` builds it.

    Args:
        linear: the product: an :class:`Int4Linear` of ``[V, d]`` (a Q4 head), or of ``[V, 2 d]`` over
            the input written twice (a Q8_0 head, ``doubled``); or a
            :class:`~redrafter.w4a8.W4A8Linear` of ``[V, d]`` with 4- or 8-bit codes.
        doubled: whether the input is written twice.
        max_rows: :meth:`covers` only inputs of at most this many rows.
        exact: the float head's weights ``[V, d]`` (the target's own tensor), with ``bounds``
            (:func:`~redrafter.w4a8.argmax_bounds`): a w4a8 ``linear`` then :meth:`certifies` the
            argmax itself.
    """

    def __init__(
        self,
        linear: nn.Module,
        doubled: bool,
        max_rows: int = ARGMAX_HEAD_MAX_ROWS,
        exact: torch.Tensor | None = None,
        bounds: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.linear, self.doubled, self.max_rows, self.exact = linear, doubled, max_rows, exact
        self.register_buffer("bounds", bounds)

    @property
    def certifies(self) -> bool:
        """Whether :meth:`argmax` gives the float head's argmax itself, for any number of rows."""
        return self.bounds is not None

    def covers(self, hidden: torch.Tensor) -> bool:
        """Whether ``hidden`` ``[..., d]`` has few enough rows for this head to be the faster one."""
        return hidden.numel() <= self.max_rows * hidden.shape[-1]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([hidden, hidden], dim=-1) if self.doubled else hidden)

    def candidates(self, hidden: torch.Tensor, count: int) -> torch.Tensor:
        """``[..., d]`` -> ``[..., count]``: the ids of the ``count`` largest logits."""
        return self(hidden).topk(count, dim=-1).indices

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> ``[...]``: the float head's greedy argmax, certified from this head's
        logits (:meth:`redrafter.w4a8.W4A8Linear.argmax`): each logit that could still win is
        computed in float32 from ``exact``, the lower id among equals. Needs :meth:`certifies`."""
        return self.linear.argmax(hidden, self.exact, self.bounds)[0]


def gguf_argmax_head(
    target: nn.Module, gguf_file: str | os.PathLike | None, weights: str = "int4"
) -> ArgmaxHead | None:
    """An :class:`ArgmaxHead` from ``gguf_file``'s output head (or the tied token embedding) when it
    is stored as Q8_0, Q4_0 or Q4_1, its values are ``target``'s head's (rounded to the head's
    dtype, row for row), and the kernel runs ``target`` (a CPU, bfloat16 or float16); else None.
    With ``weights="w4a8"`` it runs through the w4a8 kernel (Q8_0 as 8-bit codes), else through the
    int4 one (Q8_0 as two 4-bit halves)."""
    kernel = "w4a8" if weights == "w4a8" else "int4"
    head = target.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if gguf_file is None or weight is None or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    if quantization_refusal(weight.device, weight.dtype, kernel) is not None or weight.shape[0] % 16:
        return None
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(gguf_file).tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None or weight.shape[1] % GROUP_SIZE:
        return None
    shape, bias, type_name = tuple(weight.shape), getattr(head, "bias", None), tensor.tensor_type.name
    if type_name == "Q8_0":
        shifted, d = gguf_q8_0(tensor.data, shape)
        values = (shifted.float() - 128) * d.repeat_interleave(GROUP_SIZE, dim=1)
    elif type_name in GGUF_INT4_TYPES:
        codes = gguf_int4(tensor.data, type_name, shape)
        values = codes.dequantize()
    else:
        return None
    if not torch.equal(values.to(weight.dtype), weight.detach()):
        return None
    if kernel == "w4a8":
        if type_name == "Q8_0":
            linear = W4A8Linear(shifted, d, -128 * d, 8, bias, weight.dtype)
            scale, offset, units = d.half().double(), -128 * d.half().double(), shifted
        else:
            linear = w4a8_linear(codes, bias, weight.dtype)
            scale, offset, units = codes.scale.half().double(), codes.minimum.half().double(), codes.codes
        if bias is not None:
            return ArgmaxHead(linear, False, W4A8_ARGMAX_HEAD_MAX_ROWS)

        def screen(rows: slice) -> torch.Tensor:  # the kernel's own weights d u + m, in float64 (exact)
            groups = units[rows].double().unflatten(1, (-1, GROUP_SIZE))
            return (groups * scale[rows, :, None] + offset[rows, :, None]).flatten(1)

        exact = weight.detach()
        chunks = [slice(i, i + 4096) for i in range(0, shape[0], 4096)]  # float64 copies a chunk at a time
        bounds = torch.cat([argmax_bounds(exact[rows], screen(rows)) for rows in chunks], dim=1)
        return ArgmaxHead(linear, False, W4A8_ARGMAX_HEAD_MAX_ROWS, exact, bounds)
    if type_name == "Q8_0":
        return ArgmaxHead(Int4Linear(gguf_q8_0_as_int4(tensor.data, shape), bias, weight.dtype), True)
    return ArgmaxHead(Int4Linear(codes, bias, weight.dtype), False)


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as int8 codes and one scale per output row.

    Args:
        weight: ``[N, K]`` float weights, quantized here (``scale = max |w| / 127`` per row).
        bias: ``[N]`` or None.
        dtype: the activations' dtype (the scales are stored in it).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        check_quantizable(torch.device("cpu"), dtype, "int8")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.register_buffer("codes", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def fused(cls, parts: list[Int8Linear]) -> Int8Linear:
        """One layer computing ``parts``' outputs side by side; the parts then hold views of it."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features = parts[0].in_features
        fused.out_features = sum(part.out_features for part in parts)
        fused.register_buffer("codes", torch.cat([part.codes for part in parts]))
        fused.register_buffer("scales", torch.cat([part.scales for part in parts]))
        fused.register_buffer("bias", fused_bias(parts))
        sizes = [part.out_features for part in parts]
        for part, codes, scales in zip(parts, fused.codes.split(sizes), fused.scales.split(sizes), strict=True):
            part.codes, part.scales = codes, scales
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``."""
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def has_bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 matrix instructions. oneDNN also reports bfloat16 support on
    plain AVX-512 (Skylake to Ice Lake Xeons), where it converts as it goes: measured on an Ice Lake
    Xeon, a 17-token forward of the default model took 158 ms with bfloat16 GEMMs and 87 ms with
    float32 ones. So on x86 it takes AVX-512 BF16 or AMX; elsewhere oneDNN's answer stands."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def converts_bf16() -> bool:
    """Whether oneDNN offers bfloat16 products on this CPU without its bfloat16 instructions,
    converting as it goes (plain AVX-512: :func:`has_bf16_instructions`)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported() and not has_bf16_instructions()


def float32_gemm_min_rows() -> int:
    """Rows from which :class:`Float32GemmLinear` runs float32 GEMMs on this CPU:
    :data:`FLOAT32_GEMM_MIN_ROWS_CONVERTING` where :func:`converts_bf16`, else
    :data:`FLOAT32_GEMM_MIN_ROWS`."""
    return FLOAT32_GEMM_MIN_ROWS_CONVERTING if converts_bf16() else FLOAT32_GEMM_MIN_ROWS


def lacks_half_gemm(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` (bfloat16 or float16) matrix products on ``device`` lack native CPU
    instructions (:func:`has_bf16_instructions`; oneDNN's check for float16), so that
    :class:`Float32GemmLinear` pays."""
    if not _on_cpu(device):
        return False
    if dtype == torch.bfloat16:
        return not has_bf16_instructions()
    if dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def packs_linears(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether :class:`PackedLinear` serves ``dtype`` weights themselves on ``device``: a CPU with
    native bfloat16 (float16) matrix instructions (:func:`lacks_half_gemm`). Where oneDNN converts as
    it goes (plain AVX-512), a packed bfloat16 forward measured 11% slower for one token, though 9 to
    13% faster over 4 to 8 (``docs/avx2/icelake_ab.py``); there the float32 copies are packed instead
    (:func:`packs_float32_copies`)."""
    return _on_cpu(device) and dtype in (torch.bfloat16, torch.float16) and not lacks_half_gemm(device, dtype)


def packs_float32_copies(device: torch.device | str) -> bool:
    """Whether :class:`PackedLinear` serves :class:`Float32GemmLinear` layers on ``device``: a CPU where
    oneDNN converts bfloat16 as it goes (:func:`converts_bf16`), where it was measured to pay. On AVX2
    CPUs (no bfloat16 in oneDNN at all) it is not measured, so their layers stay unpacked."""
    return _on_cpu(device) and converts_bf16()


def packable(module: nn.Module) -> bool:
    """Whether :class:`PackedLinear` takes ``module`` in a packed forward: a plain float linear layer
    where :func:`packs_linears`, or a :class:`Float32GemmLinear` where :func:`packs_float32_copies`."""
    if type(module) is Float32GemmLinear:
        return packs_float32_copies(module.weight.device)
    return type(module) is nn.Linear and packs_linears(module.weight.device, module.weight.dtype)


class PackedLinear(nn.Module):
    """A float linear layer whose weight is also held in oneDNN's blocked layout, reordered once
    (see the module docstring). Products over at most :data:`PACKED_MAX_ROWS` rows run on that copy;
    over more, the layer's own product. A :class:`Float32GemmLinear` has its float32 copy reordered,
    and runs its own product below :data:`FLOAT32_PACKED_MIN_ROWS` rows (and below its ``min_rows``)
    too. A compiled forward does not use it (Inductor lays out its own).

    Args:
        linear: a :class:`torch.nn.Linear` on the CPU in bfloat16 or float16 (:func:`packs_linears`),
            or a :class:`Float32GemmLinear` on the CPU; it is kept as it is, with its weights.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.float32 = type(linear) is Float32GemmLinear
        if not (self.float32 and _on_cpu(linear.weight.device)) and not packable(linear):
            raise ValueError(f"cannot pack {linear} ({linear.weight.dtype} on {linear.weight.device})")
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.min_rows = max(linear.min_rows, FLOAT32_PACKED_MIN_ROWS) if self.float32 else 1
        weight, self.bias = (linear.weight32, linear.bias32) if self.float32 else (linear.weight.detach(), linear.bias)
        # An opaque oneDNN tensor, a plain attribute: Module.to() could not convert it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_LAYOUT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``."""
        if not self.min_rows * self.in_features <= x.numel() <= PACKED_MAX_ROWS * self.in_features:
            return self.linear(x)
        inputs = x.float().contiguous() if self.float32 else x.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(inputs, self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        rows = f"from {self.min_rows} " if self.min_rows > 1 else ""
        kind = "float32 copy " if self.float32 else ""
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, {kind}packed {rows}up to {PACKED_MAX_ROWS} rows"


class Float32GemmLinear(nn.Linear):
    """A bfloat16 (or float16) linear layer whose products over many rows run in float32.

    ``x [..., K]`` with fewer than ``min_rows`` rows: the layer's own product. With more: float32
    GEMM of ``x`` on a float32 copy of the weights (``weight32``, not saved), rounded back to
    ``x``'s dtype. ``weight`` stays the same parameter (a tied head stays tied).
    """

    weight32: torch.Tensor
    bias32: torch.Tensor | None

    @classmethod
    def wrap(cls, linear: nn.Linear, min_rows: int = FLOAT32_GEMM_MIN_ROWS) -> Float32GemmLinear:
        """A layer with ``linear``'s parameters (the same tensors) and their float32 copies."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.min_rows = linear.in_features, linear.out_features, min_rows
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.register_buffer("weight32", linear.weight.detach().float(), persistent=False)
        bias32 = None if linear.bias is None else linear.bias.detach().float()
        layer.register_buffer("bias32", bias32, persistent=False)
        return layer

    @classmethod
    def fused(cls, parts: list[Float32GemmLinear]) -> Float32GemmLinear:
        """One layer computing ``parts``' outputs side by side; the parts then hold views of its
        weights and float32 copies."""
        weight = torch.cat([part.weight.detach() for part in parts])
        bias = fused_bias(parts)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        fused = cls.wrap(linear, parts[0].min_rows)
        sizes = [part.out_features for part in parts]
        for part, view, view32 in zip(parts, weight.split(sizes), fused.weight32.split(sizes), strict=True):
            part.weight, part.weight32 = nn.Parameter(view, requires_grad=False), view32
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., K]`` -> ``[..., N]``."""
        if x.numel() < self.min_rows * self.in_features:
            return super().forward(x)
        return nn.functional.linear(x.float(), self.weight32, self.bias32).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, float32 GEMMs from {self.min_rows} rows"


def fused_bias(parts: list[nn.Module]) -> torch.Tensor | None:
    """Linear layers' biases side by side (zeros for a layer without one), or None if none has one."""
    if all(part.bias is None for part in parts):
        return None
    like = next(part.bias for part in parts if part.bias is not None).detach()
    return torch.cat([like.new_zeros(p.out_features) if p.bias is None else p.bias.detach() for p in parts])


@dataclass
class QuantizationReport:
    """What :func:`quantize_target` did: layer counts and the bytes the linear layers now take."""

    weights: str
    from_file: int = 0
    from_weights: int = 0
    linear_bytes: int = 0
    float32_gemm_layers: int = 0
    dense_bytes: int = 0  # int4 layers' dequantized copies, for prefills (:attr:`Int4Linear.dense`)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def gguf_stores_int4(gguf_file: str | os.PathLike) -> bool:
    """Whether ``gguf_file`` stores every matrix of its transformer blocks (``blk.N.*``, the decoder's
    linear layers) as Q4_0 or Q4_1, so that int4 weights run the file's own values throughout."""
    import gguf

    matrices = [t for t in gguf.GGUFReader(gguf_file).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return bool(matrices) and all(t.tensor_type.name in GGUF_INT4_TYPES for t in matrices)


def _file_int4_weights(target: nn.Module, gguf_file: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Raw Q4_0/Q4_1 blocks of ``gguf_file`` by the target's module name (``model.layers.0.self_attn.q_proj``)."""
    import gguf

    reader = gguf.GGUFReader(gguf_file)
    field = reader.fields.get("general.architecture")
    arch_name = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return {}
    name_map = gguf.get_tensor_name_map(arch, target.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    found = {}
    for name, module in target.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        gguf_name = name_map.get_name(name)
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is not None and tensor.tensor_type.name in GGUF_INT4_TYPES:
            found[name] = (tensor.data, tensor.tensor_type.name)
    return found


def _match_rows(file_weight: Int4Weight, module: nn.Linear) -> Int4Weight | None:
    """``file_weight`` with its rows in the module's order (the GGUF converter permutes the rows of
    some projections, such as Llama's query and key), or None when the values do not match.

    Rows are compared after rounding to the module's dtype: the module's weights were dequantized
    from the same file by transformers, so each of its rows equals exactly one file row.
    """
    ours = module.weight.detach()
    theirs = file_weight.dequantize().to(ours.dtype)
    if theirs.shape != ours.shape:
        return None
    if torch.equal(theirs, ours):
        return file_weight
    by_bytes: dict[bytes, int] = {}
    for index, row in enumerate(theirs.float().numpy()):
        by_bytes.setdefault(row.tobytes(), index)
    order = [by_bytes.get(row.tobytes()) for row in ours.float().numpy()]
    if None in order or len(set(order)) != len(order):
        return None
    return file_weight.rows(torch.tensor(order))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantized_linear(weights: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """An :class:`Int8Linear`, :class:`Int4Linear` or :class:`~redrafter.w4a8.W4A8Linear` (both in
    Q4_1-style groups) of ``weight [N, K]``."""
    if weights == "int8":
        return Int8Linear(weight, bias, dtype)
    if weights == "w4a8":
        return w4a8_linear(quantize_int4(weight), bias, dtype)
    return Int4Linear(quantize_int4(weight), bias, dtype)


def drafter_packable(drafter: RecurrentDrafter) -> bool:
    """Whether every linear layer (and a tied head's ``[K, d]`` rows) of ``drafter`` fits the int4 and
    int8 kernels: outputs a multiple of 16, inputs of :data:`GROUP_SIZE`."""
    shapes = [(m.out_features, m.in_features) for m in drafter.modules() if isinstance(m, nn.Linear)]
    if drafter.config.tied_head:
        shapes.append((drafter.config.draft_vocab_size, drafter.config.hidden_size))
    return all(rows % 16 == 0 and columns % GROUP_SIZE == 0 for rows, columns in shapes)


def quantize_drafter(drafter: RecurrentDrafter, weights: str) -> RecurrentDrafter:
    """A copy of ``drafter`` (attached to its target) for decoding, with every linear layer and a
    tied head's vocabulary rows weight-only quantized (``"float"``: ``drafter`` itself).

    The copy shares the target's embedding and the n-gram table; it cannot be saved or trained.
    """
    if weights not in WEIGHTS:
        raise QuantizationError(f"unknown weight precision {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "float":
        return drafter
    device, dtype = drafter.lm_head[-1].weight.device, drafter.dtype
    check_quantizable(device, dtype, weights)
    if drafter.config.tied_head and drafter.output_rows is None:
        raise QuantizationError("attach the drafter to its target before quantizing it")
    if not drafter_packable(drafter):
        raise QuantizationError(
            f"{weights} weights cannot pack this drafter's layers: their outputs (and a tied head's draft "
            f"vocabulary) must be a multiple of 16 and their inputs of {GROUP_SIZE}"
        )
    copy = RecurrentDrafter(drafter.config).to(device=device, dtype=dtype)
    copy.load_state_dict(drafter.state_dict())
    copy.ngrams, copy._embedding, copy.output_rows = drafter.ngrams, drafter._embedding, drafter.output_rows
    for name, module in [(n, m) for n, m in copy.named_modules() if isinstance(m, nn.Linear)]:
        _set_module(copy, name, quantized_linear(weights, module.weight.detach(), module.bias, dtype))
    if drafter.config.tied_head:
        copy.vocab_head = quantized_linear(weights, drafter.output_rows, None, dtype)
    return copy.eval()


def quantize_target(
    target: nn.Module,
    weights: str,
    gguf_file: str | os.PathLike | None = None,
    float32_gemms: bool | None = None,
    dense_prefill: bool | None = None,
) -> QuantizationReport:
    """Replace the linear layers of ``target``'s decoder by :class:`Int4Linear`, :class:`Int8Linear` or
    :class:`~redrafter.w4a8.W4A8Linear`,
    and where bfloat16 GEMMs lack CPU instructions, the float ones (and the head) by
    :class:`Float32GemmLinear`.

    Args:
        target: a causal LM (int8 and int4: on the CPU in bfloat16, float16 or float32).
        weights: ``"float"`` (the decoder's layers stay), ``"int8"``, ``"int4"`` or ``"w4a8"``.
        gguf_file: the GGUF file the target was loaded from, if any: with ``"int4"`` and ``"w4a8"``, its Q4_0 and
            Q4_1 tensors give the codes, scales and zeros as stored (checked against the loaded
            weights); every other layer is quantized from its weights.
        float32_gemms: run products over many rows of the remaining float layers in float32
            (:class:`Float32GemmLinear`); None: where :func:`lacks_half_gemm`.
        dense_prefill: with ``"int4"``, each layer also keeps its weights dequantized
            (:attr:`Int4Linear.dense`) for a prompt's prefill (the lean forward's, ``LeanDecoder``):
            in float32 where :func:`lacks_half_gemm`, else in the activations' dtype. None: for a
            bfloat16 or float16 target (see :data:`DENSE_PREFILL_MIN_ROWS`).
    Returns:
        a :class:`QuantizationReport`.
    """
    if weights not in WEIGHTS:
        raise QuantizationError(f"unknown weight precision {weights!r}; choose one of {', '.join(WEIGHTS)}")
    report = QuantizationReport(weights)
    if weights != "float":
        if dense_prefill is None:
            dense_prefill = target.dtype in (torch.bfloat16, torch.float16)
        dense_dtype = None
        if dense_prefill and weights == "int4":
            dense_dtype = torch.float32 if lacks_half_gemm(target.device, target.dtype) else target.dtype
        _quantize_decoder(target, weights, gguf_file, report, dense_dtype)
    if float32_gemms is None:
        float32_gemms = lacks_half_gemm(target.device, target.dtype)
    if float32_gemms:
        head = target.get_output_embeddings()
        for name, module in list(target.named_modules()):
            if type(module) is nn.Linear and (weights == "float" or module is head):
                _set_module(target, name, Float32GemmLinear.wrap(module, float32_gemm_min_rows()))
                report.float32_gemm_layers += 1
    return report


def _quantize_decoder(
    target: nn.Module,
    weights: str,
    gguf_file: str | os.PathLike | None,
    report: QuantizationReport,
    dense_dtype: torch.dtype | None = None,
) -> None:
    """Quantize the linear layers of ``target``'s decoder to ``weights`` (int8, int4) in place;
    ``dense_dtype``: int4 layers also keep their weights dequantized in it."""
    check_quantizable(target.device, target.dtype, weights)
    decoder = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    prefix = next(name for name, module in target.named_modules() if module is decoder)
    linears = [(f"{prefix}.{n}".lstrip("."), m) for n, m in decoder.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QuantizationError(f"model type {target.config.model_type!r} has no linear layers to quantize")
    for name, module in linears:
        if module.out_features % 16 or module.in_features % GROUP_SIZE:
            raise QuantizationError(
                f"{weights} weights cannot pack {name} ([{module.out_features}, {module.in_features}]): "
                f"outputs must be a multiple of 16 and inputs of {GROUP_SIZE}"
            )
    file_weights = _file_int4_weights(target, Path(gguf_file)) if weights in INT4_CODES and gguf_file else {}
    for name, module in linears:
        if weights == "int8":
            replacement: nn.Module = quantized_linear("int8", module.weight, module.bias, target.dtype)
            report.from_weights += 1
        else:
            matched = None
            if name in file_weights:
                data, type_name = file_weights[name]
                matched = _match_rows(gguf_int4(data, type_name, tuple(module.weight.shape)), module)
            report.from_file += matched is not None
            report.from_weights += matched is None
            codes = matched or quantize_int4(module.weight)
            if weights == "w4a8":
                replacement = w4a8_linear(codes, module.bias, target.dtype)
            else:
                replacement = Int4Linear(codes, module.bias, target.dtype, dense_dtype)
        dense = getattr(replacement, "dense", None)
        report.dense_bytes += 0 if dense is None else dense.numel() * dense.element_size()
        report.linear_bytes += sum(b.numel() * b.element_size() for b in replacement.buffers() if b is not dense)
        _set_module(target, name, replacement)
    _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the replaced float weights' memory back to the operating system. glibc keeps large freed
    blocks in the heap, so without this the process stays as large as with float weights (measured:
    887 MiB resident after int4 quantization of the default model, 567 MiB after the trim)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
