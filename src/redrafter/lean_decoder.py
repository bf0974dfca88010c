"""A lean forward of Llama-family decoders (Llama, Mistral, Qwen2) over :class:`TreeKVCache`.

On a 2-core CPU, transformers' generic decoder spends about as long in Python and small tensor
operations as in the matrix products of a one-token forward of the default model. This module runs
the same model with fewer operations, in the style of gpt-fast:

- the query, key and value projections are one matrix product, and so are the gate and up
  projections: their weights are concatenated once, and the model's own modules then hold views of
  the fused weights, so no memory is added;
- the rotary tables are made once, by the model's own rotary module, for every position;
- grouped-query attention is one SDPA call per layer, with the query heads of each key/value head
  packed along the query axis (as transformers does for one token), so keys and values are never
  repeated;
- the additive masks of :func:`redrafter.tree.layer_masks` go straight to SDPA; decode steps (a
  non-empty cache) run :func:`redrafter.attention.invariant_attention` instead where our kernels run
  (bfloat16, float32), whose result for a token does not depend on the tree around it: with
  batch-invariant products (int8, int4, w4a8) speculative decoding then equals plain decoding bit for bit;
- a w4a8 target's decode steps run each layer as one C call (:class:`redrafter.fused_layer.FusedLayers`,
  the same arithmetic without PyTorch's per-operation overhead: half of such a step), and so do its
  prefills (their attention then sums as a decode step's does, not as SDPA's: a prompt's cache can
  differ from the unfused prefill's in last bits, the same for plain and speculative decoding);
- where oneDNN has native bfloat16 products, the float layers' weights are reordered once into its
  blocked layout (:class:`redrafter.quant.PackedLinear`), which ``F.linear`` would do on every call:
  on the development machine a bfloat16 step's products became 1.2 to 2x faster, their results equal
  bit for bit, at the cost of a second copy of those weights (``packed``, :func:`target_forward`);
  where it converts bfloat16 as it goes (plain AVX-512), the layers' float32 copies
  (:class:`redrafter.quant.Float32GemmLinear`) are reordered instead.

The arithmetic is the model's: norms in float32 then cast, as the model's RMSNorm; rotary values
from the model's module; the model's attention scaling. Outputs equal transformers' up to
floating-point summation order (``tests/test_lean_decoder.py``).

Models that this forward does not cover (other families, dynamic rotary scaling, extra norms) run
through transformers: :func:`target_forward` picks.

**Compiled** (:class:`CompiledDecoder`, opt-in): the same forward through ``torch.compile`` with
dynamic shapes, which fuses the norms, rotary and residual operations into a few generated kernels
and drops Python's per-operation overhead (the matrix products stay the library's). On a 2-core CPU
this made the int4 target's one-token forward 1.3 to 1.5x faster in the decode loop. Compiling costs
minutes on such a CPU (a graph each for the prefill, one-token steps and wider steps, for one row and
for more), so it pays for a server or a long batch, not one short answer. Fused kernels round
bfloat16 intermediates differently from eager ones, so output can differ from the eager forward's
at near-ties of the target's logits, as any change of kernels does.

**Autotuned int4 products.** On a CPU with AVX-512, a compiled forward of an int4 target also lets
Inductor choose, per product shape, between aten's int4 kernel and its own C++ template (an AMX or
AVX-512 micro-kernel), which reads the codes once for many rows: on this project's 2-core Xeon a
16-token forward of the default model cost 24.7 ms against 47.4 ms compiled with aten's kernel
(``docs/compile/README.md``). Inductor offers the template only for weights it may fold as
constants, so the graphs are compiled with ``freezing`` and GEMM autotuning on
(:data:`INT4_AUTOTUNE`), set around each call rather than for the process (dynamo reads ``freezing``
while it traces, before the backend's options apply). And it times its choices at one row count
per graph: with the rows dynamic, the first count it meets, whose choice then serves every other
(measured: slower than aten's kernel at 2 to 4 rows after a choice made at 16). So a step's
products get their ``B q`` rows padded with zero rows to the next of :data:`INT4_ROW_BUCKETS`: a
graph per bucket, the rest of each graph dynamic. Prefills (an empty cache) and steps of more rows
than the last bucket are not padded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .attention import invariant_attention, invariant_attention_refusal
from .fused_layer import PRODUCTS, FusedLayers, fused_layers_refusal
from .kv_cache import TreeKVCache
from .models import context_limit, decoder_features, decoder_of
from .quant import (
    INT4_FUSE_ROWS,
    Float32GemmLinear,
    Int4Dense,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    fused_bias,
    has_dense,
    packable,
)
from .w4a8 import W4A8Linear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

Masks = torch.Tensor | dict[str, torch.Tensor]
TargetForward = Callable[[torch.Tensor, torch.Tensor, Masks, TreeKVCache, tuple[int, ...]], torch.Tensor]
"""``(input_ids [B, q], positions [B, q], masks, cache, layers) -> [B, q, (1 + n) d]``: the final
hidden states, then the outputs of the ``n`` decoder layers ``layers`` (the features a drafter with
fused layers reads; ``()``: the final hidden states alone). ``masks``: additive ``[B, 1, q, K]``, or
one per layer type (:func:`redrafter.tree.layer_masks`)."""

# Row counts (batch rows x new tokens) to which a compiled forward with autotuned int4 products pads
# their inputs: one graph each, its kernels chosen at that row count. Powers of two: the padding is
# at most as many rows as the real ones, and measured, the int4 forward's cost grows far slower than
# its rows there (12.0, 13.3, 17.4, 20.8, 24.7, 31.3, 44.0 ms at 1 to 64 rows, docs/compile/).
INT4_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Inductor settings for those graphs: fold the weights as constants (the template needs them so) and
# autotune the matrix products between aten's kernels and the C++ templates.
INT4_AUTOTUNE = {"freezing": True, "max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def lean_support(target: PreTrainedModel) -> str | None:
    """None if :class:`LeanDecoder` runs ``target``, else why not (one line)."""
    config = target.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (lean forward: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    rope_type = getattr(decoder_of(target).rotary_emb, "rope_type", "default")
    if "dynamic" in rope_type:
        return f"rotary scaling {rope_type!r} depends on the sequence length"
    return None


def padded_product(linear: nn.Module, x: torch.Tensor, row_buckets: tuple[int, ...]) -> torch.Tensor:
    """``linear(x)`` for ``x [B, q, K]`` -> ``[B, q, N]``; with ``row_buckets``, its ``B q`` rows go in
    padded with zero rows to the first bucket that holds them (none holds them: unpadded), and the
    padding's outputs are dropped. Rows are independent in a linear layer, so this changes no real
    row's arithmetic; in a compiled graph it makes the product's row count a constant."""
    if not row_buckets:
        return linear(x)
    batch, length, features = x.shape
    rows = batch * length
    bucket = next((b for b in row_buckets if rows <= b), None)
    if bucket is None:
        return linear(x)
    flat = F.pad(x.reshape(rows, features), (0, 0, 0, bucket - rows))
    return linear(flat)[:rows].view(batch, length, -1)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One linear layer whose outputs are ``parts``' outputs side by side.

    ``parts``: :class:`torch.nn.Linear`, :class:`Float32GemmLinear`, :class:`Int4Linear`,
    :class:`Int8Linear` or :class:`~redrafter.w4a8.W4A8Linear` of one kind, with the same inputs.
    Afterwards each part holds a view of the fused weights (float weights and their float32 copies,
    int8 weights, int4 and w4a8 codes); only int4's small scale tables and the biases are copied.
    Int4 layers whose outputs do not fill whole packing blocks are not fused but run :class:`SideBySide`.
    """
    kind = type(parts[0])
    if any(type(part) is not kind for part in parts):
        raise TypeError(f"cannot fuse {[type(p).__name__ for p in parts]}")
    sizes = [part.out_features for part in parts]
    if kind is Int4Linear:
        if any(size % INT4_FUSE_ROWS for size in sizes):
            return SideBySide(parts)
        return Int4Linear.fused(parts)
    if kind is Int8Linear:
        return Int8Linear.fused(parts)
    if kind is W4A8Linear:
        return W4A8Linear.fused(parts, fused_bias(parts))
    if kind is Float32GemmLinear:
        return Float32GemmLinear.fused(parts)
    weight = torch.cat([part.weight.detach() for part in parts])
    bias = fused_bias(parts)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    for part, view in zip(parts, weight.split(sizes), strict=True):
        part.weight = nn.Parameter(view, requires_grad=False)
    return fused


class SideBySide(nn.Module):
    """Linear layers that cannot be fused, run one after another, outputs concatenated."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def masks_by_type(masks: Masks) -> dict[str | None, torch.Tensor]:
    """``masks`` as a dict by layer type (one mask for all layers: under None)."""
    return masks if isinstance(masks, dict) else {None: masks}


def layer_mask(by_type: dict[str | None, torch.Tensor], layer_type: str | None) -> torch.Tensor:
    """The mask of a layer of ``layer_type`` among :func:`masks_by_type`'s (None's where its type has none)."""
    return by_type[layer_type] if layer_type in by_type else by_type[None]


class LeanLayer(nn.Module):
    """One decoder layer's weights, fused: ``qkv`` ``[(H + 2 KV) hd, d]``, ``gate_up`` ``[2 I, d]``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.qkv = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj
        self.post_norm = layer.post_attention_layernorm.weight
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.scaling = attention.scaling
        self.layer_type = getattr(attention, "layer_type", None)


class SwappedProducts(nn.Module):
    """A :class:`LeanLayer`'s four products (:data:`PRODUCTS`), each as ``swap`` makes it (``swap``
    returns a product itself where it does not apply); :attr:`swapped`: whether any changed."""

    def __init__(self, layer: LeanLayer, swap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.swapped = False
        for name in PRODUCTS:
            linear = getattr(layer, name)
            setattr(self, name, swap(linear))
            self.swapped |= getattr(self, name) is not linear


class PackedProducts(SwappedProducts):
    """Each float product as a :class:`~redrafter.quant.PackedLinear` (quantized ones as they are)."""

    def __init__(self, layer: LeanLayer) -> None:
        super().__init__(layer, lambda linear: PackedLinear(linear) if packable(linear) else linear)


class DenseProducts(SwappedProducts):
    """For a prompt's prefill: each int4 product that keeps its weights dequantized through them
    (:func:`dense_product`), the others as they are."""

    def __init__(self, layer: LeanLayer) -> None:
        super().__init__(layer, dense_product)


def dense_product(linear: nn.Module) -> nn.Module:
    """``linear``'s product on dequantized weights where it keeps them (:class:`Int4Dense`; each part of
    a :class:`SideBySide`), else ``linear`` itself."""
    if isinstance(linear, SideBySide) and all(has_dense(part) for part in linear.parts):
        return SideBySide([Int4Dense(part) for part in linear.parts])
    return Int4Dense(linear) if has_dense(linear) else linear


# A prefill of at least this many rows (prompt tokens, over all its rows) runs the int4 layers'
# products on their dequantized weights (DenseProducts), fewer through the int4 kernel: the int4 kernel
# turns compute-bound with rows. A forward's 120 products of the default model on an Ice Lake Xeon (2
# threads, float32 copies): 33.6 against 56.8 ms at 16 rows, 57.6 against 56.2 at 32, 117 against 95
# at 64, 439 against 267 at 256, 1185 against 604 at 700 (docs/default-weights/prefill_products.py).
DENSE_PREFILL_MIN_ROWS = 32
# A w4a8 forward of more tokens a row than this (a long prompt's prefill) runs the fused layers in parts
# of this many tokens, each a prefill's next part, with the same bits as one call
# (tests/test_fused_layer.py): the kernel's scratch, about 26 kB a token, stays bounded.
FUSED_PART_TOKENS = 1024


class LeanDecoder(nn.Module):
    """The target's decoder as a lean forward (see the module docstring).

    Build it once the target's weights are final (after :func:`redrafter.quant.quantize_target`):
    it fuses the projections' weights in place.

    Args:
        target: a Llama, Mistral or Qwen2 causal LM (:func:`lean_support` says None).
    """

    def __init__(self, target: PreTrainedModel) -> None:
        super().__init__()
        reason = lean_support(target)
        if reason is not None:
            raise ValueError(f"no lean forward for this model: {reason}")
        config = target.config
        decoder = decoder_of(target)
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.max_positions = context_limit(config)  # the decode loop keeps every position below it
        self.final_norm = decoder.norm.weight
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.intermediate = config.intermediate_size
        self.layers = nn.ModuleList(LeanLayer(layer) for layer in decoder.layers)
        self.packed_layers: nn.ModuleList | None = None  # made by the first packed forward
        dense = [DenseProducts(layer) for layer in self.layers]
        self.dense_layers = nn.ModuleList(dense) if any(products.swapped for products in dense) else None
        self.cos = self.sin = torch.empty(0)
        # Decode steps through invariant_attention where it runs (module docstring); prefills keep SDPA.
        weight = self.embed.weight
        self.invariant_steps = invariant_attention_refusal(weight.dtype, weight.device, self.head_dim) is None
        # A w4a8 target's decode steps: a layer a call (redrafter.fused_layer), same arithmetic.
        refusal = fused_layers_refusal(
            self.layers, weight.dtype, weight.device, config.hidden_size, self.head_dim, self.intermediate
        )
        self.fused = None
        if self.invariant_steps and refusal is None:
            self.fused = FusedLayers(
                self.layers, self.final_norm, self.eps, self.heads, self.kv_heads, self.head_dim, self.intermediate
            )

    def packs(self) -> bool:
        """Whether a packed forward changes anything here: some layer's product is
        :func:`~redrafter.quant.packable`."""
        return any(packable(getattr(layer, name)) for layer in self.layers for name in PRODUCTS)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as the model's own: normalized in float32 (torch's fused ``rms_norm`` computes
        reduced precision in float32; the model normalizes even float64 in float32), cast back,
        then scaled."""
        normalized = F.rms_norm(x.float() if x.dtype == torch.float64 else x, (x.shape[-1],), None, self.eps)
        return weight * normalized.to(x.dtype)

    def make_tables(self, size: int, device: torch.device) -> None:
        """Rotary tables for at least ``size`` positions on ``device``, or for the model's context
        (:attr:`max_positions`, where the decode loop stops every row) when that is less, in the
        embeddings' dtype (they double as needed). Made as normal tensors even under inference mode:
        a compiled forward guards on how its tables were made.

        The decode loop's ``size`` is the cache's length plus the new tokens, known without reading
        the positions (no device sync). In a continuous batch the shared cache's length outgrows
        every row's own positions (rows join left-padded to it), even the context: the context
        is then the bound.

        The model rotates ``x cos + cat(-x2, x1) sin`` (``x1``, ``x2`` the halves of a head);
        with the first half of ``sin`` negated that is ``x cos + roll(x, hd / 2) sin``: the same
        products, fewer operations.
        """
        dtype, size = self.embed.weight.dtype, min(size, self.max_positions)
        if self.cos.shape[0] >= size and self.cos.dtype == dtype and self.cos.device == device:
            return
        size = max(size, 2 * self.cos.shape[0], 1024)
        with torch.inference_mode(False), torch.no_grad():
            probe = torch.empty(0, dtype=dtype, device=device)
            cos, sin = self.rotary(probe, torch.arange(size, device=device)[None])
            half = self.head_dim // 2
            self.cos, self.sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        masks: Masks,
        cache: TreeKVCache,
        layers: tuple[int, ...] = (),
        packed: bool = False,
    ) -> torch.Tensor:
        """``input_ids`` ``[B, q]`` at ``positions`` ``[B, q]``, after what ``cache`` holds ->
        ``[B, q, (1 + n) d]``: the final hidden states (after the last norm), then the outputs of
        decoder layers ``layers``. Appends the new keys and values to ``cache``. ``masks``: additive
        ``[B, 1, q, K]``, or one per layer type. ``packed``: the float products on weights reordered
        once (:class:`PackedProducts`, made at the first such call; see :meth:`packs`). A prefill (an
        empty ``cache``) of at least :data:`DENSE_PREFILL_MIN_ROWS` tokens runs int4 layers that keep
        their weights dequantized on those (:class:`DenseProducts`); decode steps never do, so a tree
        and a single token still get each row the same bits from the int4 kernel. A w4a8
        prefill runs :meth:`run_fused`, as decode steps do."""
        self.make_tables(cache.length + input_ids.shape[1], input_ids.device)
        if packed and self.packed_layers is None:
            self.packed_layers = nn.ModuleList(PackedProducts(layer) for layer in self.layers)
        prefill = cache.length == 0
        dense = self.dense_layers is not None and prefill and input_ids.numel() >= DENSE_PREFILL_MIN_ROWS
        invariant = self.invariant_steps and not prefill
        if self.fused is not None:
            if prefill:  # the kernel writes the cache's buffers: they must exist first
                cache.allocate(input_ids.shape[0], self.kv_heads, self.head_dim, self.fused.dtype, input_ids.device)
            if self.fused.runs(cache.layers):
                return self.run_fused(input_ids, positions, masks, cache, layers)
        return self.run(input_ids, positions, masks, cache, layers, packed=packed, dense=dense, invariant=invariant)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        masks: Masks,
        cache: TreeKVCache,
        layers: tuple[int, ...] = (),
        row_buckets: tuple[int, ...] = (),
        packed: bool = False,
        dense: bool = False,
        invariant: bool = False,
    ) -> torch.Tensor:
        """:meth:`forward` once the rotary tables cover ``positions`` (what :class:`CompiledDecoder`
        compiles: nothing in it changes the tables). ``row_buckets``: pad the matrix products' rows
        (:func:`padded_product`; ``()``: not padded). ``packed``: the products of
        :attr:`packed_layers` (made by :meth:`forward`); ``dense``: those of :attr:`dense_layers`.
        ``invariant``: attention through :func:`~redrafter.attention.invariant_attention` instead of SDPA."""
        batch, length = input_ids.shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        groups = heads // kv_heads
        x = self.embed(input_ids)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, q, hd]
        # Each key/value head's queries go along the query axis: [B, KV, G q, hd], the mask with them.
        by_type = masks_by_type(masks)
        packed_masks = {kind: m.repeat(1, 1, groups, 1) if groups > 1 else m for kind, m in by_type.items()}
        captured: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            products = self.dense_layers[index] if dense else self.packed_layers[index] if packed else layer
            h = self._norm(x, layer.input_norm)
            qkv = padded_product(products.qkv, h, row_buckets).view(batch, length, heads + 2 * kv_heads, head_dim)
            qkv = qkv.transpose(1, 2)
            rotated = qkv[:, : heads + kv_heads]
            rotated = rotated * cos + rotated.roll(head_dim // 2, dims=-1) * sin
            queries, keys = rotated[:, :heads], rotated[:, heads:]
            keys, values = cache.layers[index].update(keys, qkv[:, heads + kv_heads :])
            mask = layer_mask(packed_masks, layer.layer_type)
            attend = invariant_attention if invariant else F.scaled_dot_product_attention
            attended = attend(
                queries.reshape(batch, kv_heads, groups * length, head_dim),
                keys,
                values,
                attn_mask=mask,
                scale=layer.scaling,
            )
            attended = attended.view(batch, heads, length, head_dim).transpose(1, 2).reshape(batch, length, -1)
            x = x + padded_product(products.o_proj, attended, row_buckets)
            gate_up = padded_product(products.gate_up, self._norm(x, layer.post_norm), row_buckets)
            gate, up = gate_up.split(self.intermediate, dim=-1)
            x = x + padded_product(products.down_proj, F.silu(gate) * up, row_buckets)
            if index in layers:
                captured[index] = x
        return self._finish(x, captured, layers)

    def run_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        masks: Masks,
        cache: TreeKVCache,
        layers: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """:meth:`forward` for a decode step or a prefill through :attr:`fused`
        (:mod:`redrafter.fused_layer`): all layers and the final norm in one call (one a part of
        :data:`FUSED_PART_TOKENS` tokens, for more), the residual stream updated in place."""
        length = input_ids.shape[1]
        if length > FUSED_PART_TOKENS:
            start, by_type, parts = cache.length, masks_by_type(masks), []
            for first in range(0, length, FUSED_PART_TOKENS):
                last = min(first + FUSED_PART_TOKENS, length)
                part_masks = {kind: m[:, :, first:last, : start + last] for kind, m in by_type.items()}
                part = slice(first, last)
                parts.append(self.run_fused(input_ids[:, part], positions[:, part], part_masks, cache, layers))
            return torch.cat(parts, dim=1)
        x = self.embed(input_ids).contiguous()
        cos, sin = self.cos[positions].contiguous(), self.sin[positions].contiguous()  # [B, q, hd]
        by_type = {kind: m.to(x.dtype).contiguous() for kind, m in masks_by_type(masks).items()}
        by_layer = [layer_mask(by_type, layer.layer_type) for layer in self.layers]
        final, captured = self.fused(x, cache.layers, by_layer, cos, sin, layers)
        return features(final, captured, layers)

    def _finish(self, x: torch.Tensor, captured: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
        """The final norm of ``x`` ``[B, q, d]``, then the ``captured`` layers' outputs ``layers``."""
        return features(self._norm(x, self.final_norm), captured, layers)


def features(final: torch.Tensor, captured: dict[int, torch.Tensor], layers: tuple[int, ...]) -> torch.Tensor:
    """``[B, q, (1 + n) d]``: the final hidden states ``[B, q, d]``, then the ``captured`` outputs of
    decoder layers ``layers`` (by index)."""
    return torch.cat([final, *(captured[i] for i in layers)], dim=-1) if layers else final


def transformers_forward(target: PreTrainedModel) -> TargetForward:
    """The target's own decoder as a :data:`TargetForward`."""
    decoder = decoder_of(target)

    def forward(
        input_ids: torch.Tensor, positions: torch.Tensor, masks: Masks, cache: TreeKVCache, layers: tuple[int, ...] = ()
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": masks, "position_ids": positions}
        return decoder_features(decoder, layers, **inputs, cache=cache, use_cache=True)

    return forward


def autotunes_int4(lean: LeanDecoder) -> bool:
    """Whether a compiled ``lean`` forward autotunes its int4 products (module docstring): it has
    :class:`~redrafter.quant.Int4Linear` layers and the CPU has the AVX-512 that Inductor's int4
    templates need (elsewhere they are not offered, and padding would only add rows)."""
    has_int4 = any(isinstance(module, Int4Linear) for module in lean.modules())
    return has_int4 and torch.backends.cpu.get_cpu_capability() == "AVX512"


class CompiledDecoder(nn.Module):
    """A :class:`LeanDecoder` run through ``torch.compile`` (dynamic shapes); see the module
    docstring. A module of its own so that forward hooks (the benchmark's forward counter) see
    each call once; the compiled function calls the lean decoder's ``forward``, not its hooks.

    Int4 products are autotuned where :func:`autotunes_int4` says so (``row_buckets`` then
    :data:`INT4_ROW_BUCKETS`, else ``()``).
    """

    def __init__(self, lean: LeanDecoder, max_positions: int) -> None:
        super().__init__()
        self.lean = lean
        # Rotary tables for the whole context now: tables made again would compile every graph again.
        lean.make_tables(max_positions, lean.embed.weight.device)
        self.compiled = torch.compile(lean.run, dynamic=True)
        self.row_buckets = INT4_ROW_BUCKETS if autotunes_int4(lean) else ()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        masks: Masks,
        cache: TreeKVCache,
        layers: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """As :meth:`LeanDecoder.forward`. What would compile the graph again happens here, outside
        it: the inputs go in with a new tensor's strides (:func:`fresh_strides`; the decode loop's are often
        views of wider tensors: each new stride), the cache grows first when the new entries would
        not fit, and the rotary tables cover the positions (in a continuous batch the shared cache
        outgrows both what the rows were given at their prefill and the tables' size)."""
        masks = {k: fresh_strides(m) for k, m in masks.items()} if isinstance(masks, dict) else fresh_strides(masks)
        needed = cache.length + input_ids.shape[1]
        # One entry to spare: new entries that filled the buffer exactly would make the cache's view
        # of it the whole buffer, which the graphs guard against (it would compile one of its own).
        cache.reserve(needed + 1)
        self.lean.make_tables(needed, input_ids.device)
        inputs = (fresh_strides(input_ids), fresh_strides(positions), masks, cache, layers)
        # The forward's floats (the norms' epsilon, the attention's scaling) are the model's
        # constants. Traced as symbolic floats, Inductor meets them where no tensor can stand in for
        # them and makes dynamo trace the first graph again (a restart: about a quarter of a tiny
        # model's compile time).
        if not self.row_buckets:
            with dynamo_config.patch(specialize_float=True):
                return self.compiled(*inputs)
        # A prefill (an empty cache) is not padded: its graphs stay dynamic in every size, as without
        # buckets, so a server compiles a graph per bucket for its steps only.
        buckets = self.row_buckets if cache.length else ()
        # Weights fold as constants only with gradients off (as in the decode loop); a graph per
        # row bucket, for one row and for more, is more graphs than dynamo's default limit.
        settings = dynamo_config.patch(recompile_limit=64, specialize_float=True)
        with inductor_config.patch(INT4_AUTOTUNE), settings, torch.inference_mode():
            return self.compiled(*inputs, buckets)


def fresh_strides(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of a new tensor of its shape (a copy if it has others). Unlike
    ``contiguous``, which keeps any stride of a dimension of size 1 (a row ``[1, q]`` cut from a
    wider one), so that no graph meets a stride it guards against."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def lean_refusal(target: PreTrainedModel, lean: bool = True) -> str | None:
    """None if the lean forward runs ``target`` (and ``lean`` asks for it), else why not."""
    return "lean=False" if not lean else lean_support(target)


def compile_refusal(target: PreTrainedModel, lean: bool = True) -> str | None:
    """None if :class:`CompiledDecoder` can run ``target`` (with ``lean``), else why not (one line)."""
    if (reason := lean_refusal(target, lean)) is not None:
        return f"a compiled forward needs the lean one, and this target has none: {reason}"
    if any(isinstance(module, W4A8Linear) for module in target.modules()):
        return "torch.compile does not trace the w4a8 kernel (a C library); run w4a8 weights eagerly"
    return None


def packed_refusal(target: PreTrainedModel, lean: bool = True, compile: bool = False) -> str | None:
    """None if a packed forward (:class:`~redrafter.quant.PackedLinear`) runs ``target``, else why not
    (one line)."""
    if compile:
        return "a compiled forward is not packed (Inductor lays out the weights its own way)"
    if (reason := lean_refusal(target, lean)) is not None:
        return f"a packed forward needs the lean one, and this target has none: {reason}"
    if not target_forward(target, lean).packs():
        return (
            "it needs float weights in bfloat16 or float16 on a CPU whose oneDNN has native products for them,"
            " or float32 copies of them where oneDNN converts bfloat16 as it goes"
        )
    return None


class PackedForward:
    """The lean forward on packed products (``LeanDecoder.forward(..., packed=True)``), and the
    target's output head packed the same way.

    Attributes:
        lean: the lean decoder it runs.
        head: the target's output head as a :class:`~redrafter.quant.PackedLinear` (its logits'
            product: the decode loop's choice of tokens, :class:`~redrafter.sampling.TokenChooser`),
            or None where the head is not :func:`~redrafter.quant.packable` (a quantized or float32
            one). A tied head keeps its weight; the packed copy is a second one (56 MiB for the
            default model; 113 MiB where its float32 copy is packed).
    """

    def __init__(self, lean: LeanDecoder, head: nn.Module | None) -> None:
        self.lean = lean
        self.head = PackedLinear(head) if head is not None and packable(head) else None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.lean(*args, packed=True, **kwargs)


def forward_head(forward: TargetForward) -> nn.Module | None:
    """The head's product that goes with ``forward`` (:func:`target_forward`): a packed forward's
    packed head, else None (the target's own)."""
    return forward.head if isinstance(forward, PackedForward) else None


_built: weakref.WeakKeyDictionary[PreTrainedModel, LeanDecoder] = weakref.WeakKeyDictionary()
_compiled: weakref.WeakKeyDictionary[PreTrainedModel, CompiledDecoder] = weakref.WeakKeyDictionary()
_packed: weakref.WeakKeyDictionary[PreTrainedModel, PackedForward] = weakref.WeakKeyDictionary()


def target_forward(
    target: PreTrainedModel, lean: bool = True, compile: bool = False, packed: bool | None = False
) -> TargetForward:
    """The forward the decode loop runs: :class:`LeanDecoder` when ``lean`` and the model is
    covered (:class:`CompiledDecoder` with ``compile``), else transformers' decoder. Engines on one
    target share one lean decoder (its fused weights are made once) and one compiled one (its
    graphs are compiled once). ``compile`` needs the lean forward: a :class:`ValueError` otherwise.
    ``packed``: the lean forward's float products on weights reordered once for oneDNN
    (:class:`PackedForward`, its head packed too; a :class:`ValueError` where :func:`packed_refusal`
    says why not; ignored with ``compile``); None: where :meth:`LeanDecoder.packs`.
    The lean decoder itself is the unpacked forward (a packed one calls it, so its hooks see both)."""
    if compile and (reason := compile_refusal(target, lean)) is not None:
        raise ValueError(reason)
    if lean_refusal(target, lean) is not None:
        return transformers_forward(target)
    if target not in _built:
        _built[target] = LeanDecoder(target)
    if not compile:
        lean_decoder = _built[target]
        if packed is None:
            packed = lean_decoder.packs()
        elif packed and (refusal := packed_refusal(target, lean, compile)) is not None:
            raise ValueError(f"packed: {refusal}")
        if not packed:
            return lean_decoder
        if target not in _packed:
            _packed[target] = PackedForward(lean_decoder, target.get_output_embeddings())
        return _packed[target]
    if target not in _compiled:
        _compiled[target] = CompiledDecoder(_built[target], min(context_limit(target.config), 1 << 15))
    return _compiled[target]
