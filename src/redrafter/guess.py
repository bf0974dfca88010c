"""The drafter's guess: its most probable next token and that token's probability, for every row.

With w4a8 weights the decode loop drafts no beam (a beam search of one token cost 0.14 of a plain
step, and its token went into every tree whatever its probability). Its first step alone, one guess a
row priced by the drafter's own probability, joins each row's confidence tree at the root instead
(:mod:`redrafter.confidence`): kept where it is likely enough to pay for its node, dropped where not,
and where a lookup guess names the same token, the node is as probable as the likelier of the two.

:class:`DrafterGuess` runs that step as one call of ``kernels/drafter.c`` where the drafter's layers are
w4a8 (:func:`fused_guess_refusal`): a dozen PyTorch operations cost more dispatch on a 2-core CPU than
the step's 10 million multiply-adds take. Elsewhere it runs the same equations in PyTorch.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from .drafter import RecurrentDrafter
from .fused_layer import _Product
from .kernels import kernel_refusal, library
from .w4a8 import W4A8Linear

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
CELLS = {"reference": 0, "trtllm": 1}  # kernels/drafter.c's cell codes; 2: no RNN
GUESS_BELOW = 0.5
"""Where a lookup guess at the root is at least this probable, the row's drafter step is skipped: replayed
along MT-Bench's greedy outputs (80 prompts, ``docs/guess/``), the guess then added 0.5% of the tokens for
a third of its steps (2.348 against 2.360 tokens a step, guessing in 68% of the steps); chosen there
among 0.5 to 0.95, the estimated speed-up at a drafter step of 0.04 of a plain one highest at 0.5."""


class _Drafter(ctypes.Structure):
    """``Drafter`` of ``kernels/drafter.c``."""

    _fields_ = [
        ("rnn_w", _Product),
        ("rnn_bias", _PTR),
        ("cell", _I64),
        ("input_proj", _Product),
        ("blocks", _PTR),
        ("num_blocks", _I64),
        ("head", _Product),
        ("vocab", _Product),
    ]


def fused_guess_refusal(drafter: RecurrentDrafter) -> str | None:
    """Why :class:`DrafterGuess` cannot run ``drafter`` as one kernel call, or None when it can."""
    if drafter.fuse is not None:
        return "it reads the final hidden state alone (this drafter fuses target layers)"
    layers = [m for m in drafter.modules() if isinstance(m, (nn.Linear, W4A8Linear))]
    if drafter.config.tied_head:
        layers.append(drafter.vocab_head)
    if not all(isinstance(layer, W4A8Linear) for layer in layers):
        return "it needs every layer of the drafter in w4a8 (redrafter.quant.quantize_drafter)"
    if layers[0].dtype not in (torch.bfloat16, torch.float32) or drafter.draft_vocab.device.type != "cpu":
        return "it runs on the CPU in bfloat16 or float32"
    return kernel_refusal()


class DrafterGuess:
    """The drafter's first draft step for a batch of rows (see the module docstring).

    Args:
        drafter: the drafter attached to its target; with every layer in w4a8 (a
            :func:`~redrafter.quant.quantize_drafter` copy) it runs as one kernel call where
            :func:`fused_guess_refusal` says None, else through PyTorch.
        below: the decode loop asks for a row's guess only where the likeliest lookup guess at its root
            is less probable than this (:meth:`redrafter.confidence.ConfidenceTree.root_confidence`);
            above 1: every step.
    """

    def __init__(self, drafter: RecurrentDrafter, below: float = GUESS_BELOW) -> None:
        self.drafter, self.below = drafter, below
        self.refusal = fused_guess_refusal(drafter)
        self.struct: _Drafter | None = None
        if self.refusal is None:
            self._build()

    def _product(self, linear: W4A8Linear | None) -> _Product:
        """A layer's codes, scales and float32 bias (held), or an empty product for None."""
        if linear is None:
            return _Product(None, None, None, 0, 0, 0)
        bias = None
        if linear.bias is not None:
            bias = linear.bias.detach().float().contiguous()
            self.tensors.append(bias)
        self.tensors += [linear.codes, linear.scales]
        return _Product(
            linear.codes.data_ptr(), linear.scales.data_ptr(), None if bias is None else bias.data_ptr(),
            linear.bits, linear.out_features, linear.in_features,
        )  # fmt: skip

    def _build(self) -> None:
        drafter, config = self.drafter, self.drafter.config
        # The tensors whose addresses the kernel gets, held as long as this object.
        self.tensors: list[torch.Tensor] = []
        rnn_bias = None
        if config.rnn and config.rnn_cell == "reference":
            rnn_bias = drafter.rnn_u.bias.detach().float().contiguous()
            self.tensors.append(rnn_bias)
        blocks = (_Product * config.num_draft_layers)(*(self._product(block.linear) for block in drafter.lm_head[:-1]))
        self.blocks = blocks
        self.struct = _Drafter(
            self._product(drafter.rnn_w if config.rnn else None),
            None if rnn_bias is None else rnn_bias.data_ptr(),
            CELLS[config.rnn_cell] if config.rnn else 2,
            self._product(drafter.input_proj),
            ctypes.cast(blocks, _PTR),
            config.num_draft_layers,
            self._product(drafter.lm_head[-1]),
            self._product(drafter.vocab_head if config.tied_head else None),
        )
        self.function = library().drafter_guess
        self.dtype = drafter.lm_head[-1].dtype  # the activations' (a quantized copy's scales are float16)
        self.vocab = drafter.draft_vocab.contiguous()
        # The target's embedding table, read in place by the kernel where it is a plain one in the
        # activations' dtype (a scaled embedding, as Gemma's, is gathered through its module instead).
        embedding = drafter._embedding[0] if drafter._embedding else None
        plain = type(embedding) is nn.Embedding and embedding.weight.dtype == self.dtype
        self.table = embedding.weight.detach().contiguous() if plain else None

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor, last_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [B, F]`` the target's features at each row's last accepted position, ``last_token
        [B]`` the token it produced there -> the drafter's most probable next token ``[B]`` (target
        ids) and its probability ``[B]`` (float32) under the drafter."""
        drafter = self.drafter
        if self.struct is None:
            state = drafter.rnn_step(None, drafter.embed(last_token))
            logits = drafter.head(drafter.condition(hidden.to(drafter.dtype)), state).float()
            probabilities, draft_ids = logits.softmax(dim=-1).max(dim=-1)
            return drafter.to_target_ids(draft_ids), probabilities
        batch = hidden.shape[0]
        if hidden.dtype != self.dtype or hidden.stride(-1) != 1:
            hidden = hidden.to(self.dtype).contiguous()
        table, ids = self.table, last_token.long().contiguous()
        if table is None:  # an embedding module other than a plain table: its rows, gathered
            table, ids = drafter.embed(last_token).to(self.dtype).contiguous(), torch.arange(batch)
        tokens = torch.empty(batch, dtype=torch.long)
        probabilities = torch.empty(batch, dtype=torch.float32)
        status = self.function(
            ctypes.byref(self.struct), hidden.data_ptr(), hidden.stride(0), table.data_ptr(), ids.data_ptr(),
            self.dtype == torch.bfloat16, batch, self.vocab.data_ptr(), tokens.data_ptr(), probabilities.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("drafter guess: no memory for its scratch")
        return tokens, probabilities
