"""Decode steps of a w4a8 target, one C call per decoder layer (``kernels/layer.c``).

With w4a8 products, a one-token step of the default model spent as long around its products as in
them: each PyTorch operation and each call of a product costs 1 to 15 microseconds of dispatch on
this project's 2-core CPU, and a layer runs about twenty of them (norms, rotary, cache writes,
attention, SiLU, residual adds). :class:`FusedLayers` runs each layer as one call instead: the norms,
the four w4a8 products, the rotary embedding, the cache write, the invariant attention, the SiLU gate
and the residual adds, in one parallel region.

The arithmetic is the unfused forward's (:meth:`redrafter.lean_decoder.LeanDecoder.run` with w4a8
products and :func:`~redrafter.attention.invariant_attention`), rounded to the activations' dtype at
the same places; only the RMSNorm's sum of squares and the SiLU's exponential are computed in another
order, which can move a bfloat16 result by its last bit (``tests/test_fused_layer.py`` bounds it). Each
row runs the same instructions whatever rows share the call, so a tree and a single token get the
same bits, and speculative decoding stays equal to plain decoding.

:meth:`LeanDecoder.forward <redrafter.lean_decoder.LeanDecoder.forward>` uses it for every decode step
and every prompt's prefill (in parts of :data:`~redrafter.lean_decoder.FUSED_PART_TOKENS` tokens)
where :func:`fused_layers_refusal` says None. Its attention scores sixteen kept keys at a time, so even
over a 4,000-token prompt it beat SDPA on this project's CPU (``docs/prefetch/``).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from .kernels import kernel_refusal, library
from .kv_cache import ContiguousLayer
from .w4a8 import W4A8Linear

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Product(ctypes.Structure):
    """``Product`` of ``kernels/layer.c``: a :class:`W4A8Linear`'s buffers."""

    _fields_ = [
        ("codes", _PTR),
        ("scales", _PTR),
        ("bias", _PTR),
        ("bits", _I64),
        ("out_features", _I64),
        ("in_features", _I64),
    ]


class _Layer(ctypes.Structure):
    """``Layer`` of ``kernels/layer.c``: a decoder layer's weights and sizes."""

    _fields_ = [
        ("qkv", _Product),
        ("o_proj", _Product),
        ("gate_up", _Product),
        ("down_proj", _Product),
        ("input_norm", _PTR),
        ("post_norm", _PTR),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("intermediate", _I64),
    ]


def _product(linear: W4A8Linear) -> _Product:
    bias = 0 if linear.bias is None else linear.bias.data_ptr()
    return _Product(
        linear.codes.data_ptr(), linear.scales.data_ptr(), bias, linear.bits, linear.out_features, linear.in_features
    )


# The layer's products in the struct's order: LeanLayer's attributes of these names.
PRODUCTS = tuple(name for name, kind in _Layer._fields_ if kind is _Product)


def fused_layers_refusal(
    layers: nn.ModuleList, dtype: torch.dtype, device: torch.device, hidden: int, head_dim: int, intermediate: int
) -> str | None:
    """Why :class:`FusedLayers` cannot run these :class:`~redrafter.lean_decoder.LeanLayer` s, or None."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return "it runs on the CPU in bfloat16 or float32"
    products = [getattr(layer, name) for layer in layers for name in PRODUCTS]
    if not all(isinstance(p, W4A8Linear) and p.dtype == dtype for p in products):
        return "it needs every product of every layer in w4a8"
    norms = [norm for layer in layers for norm in (layer.input_norm, layer.post_norm)]
    if any(norm.dtype != dtype or not norm.is_contiguous() for norm in norms):
        return "it needs the norms' weights in the activations' dtype"
    if hidden % 32 or intermediate % 32 or head_dim % 32 or head_dim > 256:
        return "it needs hidden and intermediate sizes in multiples of 32, and a head size of 32 to 256 in steps of 32"
    return kernel_refusal()


class FusedLayers:
    """A decode step through all :class:`~redrafter.lean_decoder.LeanLayer` s of a w4a8 target and its
    final norm as one call of ``kernels/layer.c`` (see the module docstring). Holds the layers' tensors,
    whose addresses it gives the kernel, so build it once the weights are final, as the lean decoder.

    Args:
        layers: the lean decoder's layers (:func:`fused_layers_refusal` says None for them).
        final_norm: the final RMSNorm's weight ``[d]``.
        eps: the RMSNorm's epsilon.
        heads, kv_heads, head_dim, intermediate: the model's sizes.
    """

    def __init__(
        self,
        layers: nn.ModuleList,
        final_norm: torch.Tensor,
        eps: float,
        heads: int,
        kv_heads: int,
        head_dim: int,
        intermediate: int,
    ) -> None:
        self.dtype = layers[0].input_norm.dtype
        # The tensors whose addresses the kernel gets, held so that their memory outlives any change of
        # the modules (a module moved or cast gets new tensors; these stay valid, if stale).
        self.final_norm = final_norm.detach().to(self.dtype).contiguous()
        self.tensors = [
            tensor
            for layer in layers
            for tensor in (
                layer.input_norm,
                layer.post_norm,
                *(t for name in PRODUCTS for t in getattr(layer, name).buffers()),
            )
        ]
        self.structs = (_Layer * len(layers))(
            *(
                _Layer(
                    *(_product(getattr(layer, name)) for name in PRODUCTS),
                    layer.input_norm.data_ptr(),
                    layer.post_norm.data_ptr(),
                    eps,
                    layer.scaling,
                    heads,
                    kv_heads,
                    head_dim,
                    intermediate,
                )
                for layer in layers
            )
        )
        self.function = library().fused_layers

    def runs(self, cache_layers: list[ContiguousLayer]) -> bool:
        """Whether a step can run here with these cache layers: allocated, contiguous, in the
        activations' dtype, all of one capacity (a cache made elsewhere may not be)."""
        return all(
            layer.is_initialized and layer.keys.dtype == self.dtype and layer.keys.is_contiguous()
            and layer.values.is_contiguous() and layer.capacity == cache_layers[0].capacity
            for layer in cache_layers
        )  # fmt: skip

    def __call__(
        self,
        x: torch.Tensor,
        cache_layers: list[ContiguousLayer],
        masks: list[torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        capture: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The layers on ``x`` ``[B, q, d]`` (contiguous, updated in place), appending the new keys and
        values to ``cache_layers``; returns the final norm of the result ``[B, q, d]`` and the outputs
        of the layers ``capture`` (by index).

        Args:
            masks: each layer's additive mask ``[B or 1, 1, q, K]`` in ``x``'s dtype, all of one shape,
                the keys contiguous (``K``: the cached entries and the new ones).
            cos, sin: ``[B, q, hd]`` contiguous: the rotary tables at each token's position.
        """
        batch, length = x.shape[:2]
        start, end = cache_layers[0].length, cache_layers[0].length + length
        if end > cache_layers[0].capacity:
            for layer in cache_layers:
                layer._grow(end)
        count = len(cache_layers)
        keys = (_PTR * count)(*(layer.keys.data_ptr() for layer in cache_layers))
        values = (_PTR * count)(*(layer.values.data_ptr() for layer in cache_layers))
        mask = masks[0]
        captured = {index: torch.empty_like(x) for index in capture}
        out = torch.empty_like(x)
        status = self.function(
            self.structs, count, x.dtype == torch.bfloat16, x.data_ptr(), batch, length, keys, values,
            cache_layers[0].capacity, start, (_PTR * count)(*(m.data_ptr() for m in masks)),
            mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), cos.data_ptr(), sin.data_ptr(),
            (_PTR * count)(*(captured[i].data_ptr() if i in captured else None for i in range(count))),
            self.final_norm.data_ptr(), out.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("fused layers: no memory for their scratch")
        for layer in cache_layers:
            layer.length = end
        return out, captured
