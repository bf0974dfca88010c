"""The recurrent drafter: an RNN over token embeddings plus an MLP head conditioned on the target.

Equations (``../shared/DESIGN.md``): with ``s_0 = 0``,
``s_i = SiLU(W_rnn E(g_{i-1}) + U_rnn s_{i-1} + b)``, ``x_i = concat(h, s_i)``, optional
``input_proj`` (2d -> exit_dim), ``N`` residual blocks ``x + SiLU(Linear(x))`` and a bias-free
vocabulary head. ``E`` is the target's own (frozen, shared) embedding table and is never saved.

With ``tied_head`` the vocabulary head is factorised: a learned projection ``exit_dim -> d`` into
the target's own hidden space, then the target's frozen output embedding rows of the draft
vocabulary. The drafter then predicts "the hidden state the target will have", in the target's
geometry: 4x fewer trained parameters (less over-fitting on a small corpus) and a cheaper draft
step. Its ``[K, exit_dim]`` reference head is the product of the two (:meth:`reference_head`).

The vocabulary head may cover only the ``K`` most frequent target tokens (``draft_vocab``, a map
from draft ids to target ids); a drafted token outside it simply fails verification.

Saved as a folder: ``config.json`` (``model_type`` "recurrent_drafting_drafter") and
``model.safetensors`` with the reference layout's tensor names (``lm_head.{i}.linear.*``,
``lm_head.{N}.weight``, ``rnn_w.weight``, ``rnn_u.*``, ``input_proj.*``) plus ``draft_vocab``;
optionally ``ngrams.safetensors``, the corpus n-gram table that travels with the drafter
(:mod:`redrafter.ngrams`, held in :attr:`RecurrentDrafter.ngrams`).

For decoding on a CPU, :func:`redrafter.quant.quantize_drafter` makes a copy whose linear layers
and vocabulary rows run weight-only quantized (:attr:`RecurrentDrafter.vocab_head`): it drafts
almost the same tokens from half or a quarter of the bytes, and output does not change, since the
target verifies every drafted token.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .errors import RedrafterError
from .files import atomic_write
from .ngrams import NgramTable

MODEL_TYPE = "recurrent_drafting_drafter"
RNN_CELLS = ("reference", "trtllm")


class DrafterError(RedrafterError):
    """A drafter that cannot be loaded or does not fit its target."""


@dataclass
class DrafterConfig:
    """Shape of a drafter.

    Attributes:
        hidden_size: the target's hidden size ``d``.
        vocab_size: the target's vocabulary size ``V``.
        exit_dim: width of the residual head (``2 d`` means no input projection).
        num_draft_layers: number of residual blocks ``N``.
        rnn: whether the recurrence is used (off: the state is the sum of the drafted tokens'
            embeddings, as Apple's and TensorRT-LLM's code run a drafter without ``rnn_w``/``rnn_u``).
        draft_vocab_size: ``K`` rows of the vocabulary head (``V`` for the full vocabulary).
        tied_head: the head is a projection to ``d`` times the target's output embedding rows.
        fused_layers: target decoder layers (0-based) whose outputs join the final hidden state
            (EAGLE-3's multi-layer fusion): the head then reads ``fuse([h, norm(l_i), ...])``, a learned
            ``(1 + n) d -> d`` projection of the final state and each layer's RMS-normalized output
            (:meth:`RecurrentDrafter.condition`). None: the final hidden state alone (the reference
            layout, which Apple's and TensorRT-LLM's code read).
        rnn_cell: the recurrence an engine runs (:data:`RNN_CELLS`): ``"reference"`` (Apple's code
            and ours: ``s_i = SiLU(W e_i + U s_{i-1} + b)`` from ``s_0 = 0``) or ``"trtllm"``
            (TensorRT-LLM's: ``s_1 = W e_1``, then ``s_i = W e_i + U s_{i-1} + b``, no SiLU). A
            drafter drafts other tokens under the other cell, so it is trained for one.
    """

    hidden_size: int
    vocab_size: int
    exit_dim: int | None = None
    num_draft_layers: int = 2
    rnn: bool = True
    draft_vocab_size: int | None = None
    tied_head: bool = False
    rnn_cell: str = "reference"
    fused_layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.rnn_cell not in RNN_CELLS:
            raise DrafterError(f"rnn_cell is {self.rnn_cell!r}; choose one of {', '.join(RNN_CELLS)}")
        if self.fused_layers is not None:
            if not self.fused_layers or any(not isinstance(i, int) or i < 0 for i in self.fused_layers):
                raise DrafterError(f"fused_layers must be layer indices >= 0, got {self.fused_layers!r}")
            self.fused_layers = list(self.fused_layers)
        if self.exit_dim is None:
            self.exit_dim = 2 * self.hidden_size
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class RecurrentDrafter(nn.Module):
    """The drafter head. The embedding table is the target's, passed in, not owned.

    Args:
        config: the drafter's shape.
        embedding: the target's input embedding module (``[V] -> [V, d]``), frozen and shared
            (its weight also serves as the output rows of a tied head; see :meth:`attach`).
    """

    def __init__(self, config: DrafterConfig, embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        if config.rnn:  # without the RNN the reference layout has neither matrix
            self.rnn_w = nn.Linear(d, d, bias=False)
            self.rnn_u = nn.Linear(d, d, bias=True)
        self.input_proj = nn.Linear(2 * d, config.exit_dim) if config.exit_dim != 2 * d else None
        self.fuse = None
        if config.fused_layers:
            # Starts as the final hidden state alone: [I, 0, ..., 0].
            self.fuse = nn.Linear((1 + len(config.fused_layers)) * d, d, bias=False)
            with torch.no_grad():
                self.fuse.weight.zero_()[:, :d] = torch.eye(d)
        blocks: list[nn.Module] = [ResBlock(config.exit_dim) for _ in range(config.num_draft_layers)]
        head_rows = d if config.tied_head else config.draft_vocab_size
        blocks.append(nn.Linear(config.exit_dim, head_rows, bias=False))
        self.lm_head = nn.Sequential(*blocks)
        if config.tied_head and self.input_proj is None:
            # Start as the target's own head applied to h (the hidden half of x = [h, s]).
            with torch.no_grad():
                blocks[-1].weight.zero_()[:, :d] = torch.eye(d)
        self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size, dtype=torch.long), persistent=True)
        # Tied head: the target's output embedding rows of the draft vocabulary, [K, d] (not saved).
        self.register_buffer("output_rows", None, persistent=False)
        # A quantized copy's tied vocabulary head (redrafter.quant.quantize_drafter), else None.
        self.vocab_head: nn.Module | None = None
        # Held in a tuple so it is neither a submodule (saved, trained) nor moved with .to().
        self._embedding: tuple[nn.Module, ...] = (embedding,) if embedding is not None else ()
        # The corpus n-gram table trained alongside (host-side counts, not a module), or None.
        self.ngrams: NgramTable | None = None
        if embedding is not None:
            self.attach(embedding)

    # -- the target's embedding table ---------------------------------------------------------
    def attach(self, embedding: nn.Module, output_embedding: nn.Module | None = None) -> RecurrentDrafter:
        """Share the target's input ``embedding`` module (and, for a tied head, its output
        embedding, by default the input one) with this drafter."""
        self._embedding = (embedding,)
        if self.config.tied_head:
            weight = (output_embedding or embedding).weight.detach()
            rows = weight[self.draft_vocab.to(weight.device)]
            self.output_rows = rows.to(device=self.lm_head[-1].weight.device, dtype=self.lm_head[-1].weight.dtype)
        return self

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` target token ids -> ``[..., d]`` target embeddings (no gradient)."""
        if not self._embedding:
            raise DrafterError("the drafter has no embedding table: call attach(target embeddings)")
        with torch.no_grad():
            return self._embedding[0](token_ids).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the drafter computes in: its weights', or a quantized copy's activations' (a w4a8
        layer's ``dtype``, its scales being float16; int8 and int4 layers keep their scales in it)."""
        for module in self.modules():
            if module is not self and isinstance(getattr(module, "dtype", None), torch.dtype):
                return module.dtype
        return next(t.dtype for t in chain(self.parameters(), self.buffers()) if t.is_floating_point())

    # -- the equations ------------------------------------------------------------------------
    @property
    def target_layers(self) -> tuple[int, ...]:
        """The target layers whose outputs the drafter reads besides the final hidden state."""
        return tuple(self.config.fused_layers or ())

    @property
    def feature_size(self) -> int:
        """Width of the target features the drafter reads: ``(1 + n) d``."""
        return (1 + len(self.target_layers)) * self.config.hidden_size

    def condition(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., (1 + n) d]`` target features (:func:`redrafter.models.decoder_features`) ->
        ``[..., d]``, the hidden state the head reads: the final state alone without fused layers,
        else ``fuse([h, rms(l_1), ..., rms(l_n)])`` (each layer's output RMS-normalized, no weight)."""
        if self.fuse is None:
            return features
        d = self.config.hidden_size
        final, layers = features[..., :d], features[..., d:].unflatten(-1, (-1, d))
        layers = F.rms_norm(layers.float(), (d,), eps=1e-6).to(final.dtype).flatten(-2)
        return self.fuse(torch.cat([final, layers], dim=-1))

    def rnn_step(self, state: torch.Tensor | None, token_embedding: torch.Tensor) -> torch.Tensor:
        """The next RNN state from ``s_{i-1}`` (None at the first step) and ``E(g)``: ``[..., d] -> [..., d]``.

        ``reference`` cell: ``SiLU(W E(g) + U s_{i-1} + b)`` with ``s_0 = 0``; ``trtllm`` cell:
        ``W E(g)`` at the first step, then ``W E(g) + U s_{i-1} + b``. Without the RNN the state
        is the running sum of the drafted tokens' embeddings, ``E(g) + s_{i-1}``, as in both engines.
        """
        if not self.config.rnn:
            return token_embedding if state is None else token_embedding + state
        if self.config.rnn_cell == "trtllm":
            step = self.rnn_w(token_embedding)
            return step if state is None else step + self.rnn_u(state)
        if state is None:  # U s_0 + b with s_0 = 0: the bias alone (one product fewer a step)
            return F.silu(self.rnn_w(token_embedding) + self.rnn_u.bias)
        return F.silu(self.rnn_w(token_embedding) + self.rnn_u(state))

    def head(self, hidden: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary: ``[..., d], [..., d] -> [..., K]``."""
        x = torch.cat([hidden, state], dim=-1)
        if self.input_proj is not None:
            x = self.input_proj(x)
        if not self.config.tied_head:
            return self.lm_head(x)
        if self.vocab_head is not None:
            return self.vocab_head(self.lm_head(x))
        if self.output_rows is None:
            raise DrafterError("a tied-head drafter needs the target's output embedding: call attach(...)")
        return self.lm_head(x) @ self.output_rows.T

    def with_fused_layers(self, layers: list[int]) -> RecurrentDrafter:
        """A copy of this drafter (without fused layers) that also reads the target's ``layers``; its
        fusion starts as the final hidden state alone, so it drafts exactly as this one until trained."""
        if self.fuse is not None:
            raise DrafterError(f"this drafter already fuses target layers {self.config.fused_layers}")
        config = DrafterConfig(**{**asdict(self.config), "fused_layers": list(layers)})
        wider = RecurrentDrafter(config).to(device=self.lm_head[-1].weight.device, dtype=self.lm_head[-1].weight.dtype)
        missing, unexpected = wider.load_state_dict(self.state_dict(), strict=False)
        assert missing == ["fuse.weight"] and not unexpected, (missing, unexpected)
        wider.ngrams, wider._embedding, wider.output_rows = self.ngrams, self._embedding, self.output_rows
        return wider

    def reference_head(self) -> torch.Tensor:
        """The ``[K, exit_dim]`` vocabulary head of the reference layout (a product for a tied head)."""
        last = self.lm_head[-1].weight
        return self.output_rows @ last if self.config.tied_head else last

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for training.

        Args:
            hidden: ``[B, T, (1 + n) d]`` target features (the final hidden state, then the fused
                layers' outputs; :meth:`condition`).
            next_tokens: ``[B, T, S]`` target token ids fed to draft steps ``0..S-1``
                (at position ``t``: ``x_{t+1}, ..., x_{t+S}``).
        Returns:
            ``[B, T, S, K]`` logits of step ``i`` predicting ``x_{t+2+i}`` (in draft ids).
        """
        embeddings = self.embed(next_tokens)
        hidden = self.condition(hidden)
        state = None
        logits = []
        for step in range(next_tokens.shape[-1]):
            state = self.rnn_step(state, embeddings[:, :, step])
            logits.append(self.head(hidden, state))
        return torch.stack(logits, dim=2)

    # -- persistence --------------------------------------------------------------------------
    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target ids (identity for a full-vocabulary head)."""
        return self.draft_vocab[draft_ids]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json``, ``model.safetensors`` (and ``ngrams.safetensors``) to ``folder`` atomically."""
        if self.vocab_head is not None or not isinstance(self.lm_head[-1], nn.Linear):
            raise DrafterError("a quantized drafter is for decoding only: save the drafter it was made from")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **asdict(self.config)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, p))
        atomic_write(
            folder / "config.json",
            lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"),
        )
        if self.ngrams is not None:
            self.ngrams.save(folder)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        embedding: nn.Module | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        output_embedding: nn.Module | None = None,
    ) -> RecurrentDrafter:
        """Load a drafter folder (the reference layout, with or without ``draft_vocab``);
        ``embedding``/``output_embedding``: the target's, as for :meth:`attach`."""
        folder = Path(folder)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise DrafterError(f"{folder} is not a drafter folder (needs config.json and model.safetensors)")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise DrafterError(f"{config_path}: invalid JSON ({error})") from None
        if raw.get("model_type") != MODEL_TYPE:
            raise DrafterError(f"{config_path}: model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
        fields = DrafterConfig.__dataclass_fields__
        config = DrafterConfig(**{k: v for k, v in raw.items() if k in fields})
        state = {_reference_name(k): v for k, v in load_file(weights_path).items()}
        if "draft_vocab" not in state:
            state["draft_vocab"] = torch.arange(config.draft_vocab_size, dtype=torch.long)
        drafter = cls(config)
        _check_tensors(weights_path, drafter.state_dict(), state)
        drafter.load_state_dict(state, assign=True)  # keep the file's dtype (no float32 round trip)
        drafter = drafter.to(device=device, dtype=dtype)
        drafter.ngrams = NgramTable.load(folder)
        return drafter if embedding is None else drafter.attach(embedding, output_embedding)

    def check_fits(self, hidden_size: int, vocab_size: int, num_layers: int | None = None) -> None:
        """Raise :class:`DrafterError` unless this drafter was made for such a target."""
        c = self.config
        if c.hidden_size != hidden_size or c.vocab_size != vocab_size:
            raise DrafterError(
                f"drafter is for hidden size {c.hidden_size} and vocabulary {c.vocab_size}, "
                f"but the target has hidden size {hidden_size} and vocabulary {vocab_size}"
            )
        if num_layers is not None and any(i >= num_layers - 1 for i in self.target_layers):
            raise DrafterError(
                f"drafter fuses target layers {c.fused_layers}, but the target has {num_layers} layers "
                f"(fused layers must be below the last, {num_layers - 1})"
            )


def _check_tensors(path: Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """One line naming the first missing, misshapen or unexpected tensor of a drafter file."""
    for name, tensor in expected.items():
        if name not in found:
            raise DrafterError(f"{path}: tensor {name} is missing (expected shape {list(tensor.shape)})")
        if found[name].shape != tensor.shape:
            raise DrafterError(
                f"{path}: tensor {name} has shape {list(found[name].shape)}, expected {list(tensor.shape)} "
                "for the shape in config.json"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise DrafterError(f"{path}: unexpected tensors {', '.join(unexpected)} for the shape in config.json")


def _reference_name(name: str) -> str:
    """Accept the other prefixes TensorRT-LLM's converter reads: ``lm_heads.``, ``0.`` and ``input_projs.``."""
    for prefix, reference in (("lm_heads.", "lm_head."), ("0.", "lm_head."), ("input_projs.", "input_proj.")):
        if name.startswith(prefix):
            return reference + name[len(prefix) :]
    return name
