"""What the target "chooses" at each tree node: its argmax (greedy) or an exact sample.

Exact sampling over a deterministic beam tree (``../shared/DESIGN.md``): at a node with target
distribution ``p`` and drafted children ``c1, c2, ...``, accept ``c1`` with probability ``p(c1)``,
else zero it, renormalise and try ``c2``, ...; if every child is rejected, sample the bonus from
what remains. The chance of emitting ``c_k`` works out to exactly ``p(c_k)``, and of any other
token ``x`` to ``p(x)``: the rule is the same as drawing ``x ~ p`` once and descending into the
child equal to ``x`` if there is one, else emitting ``x`` as the bonus token. So one draw per
packed tree node, fed to the same longest-path acceptance as greedy decoding
(:func:`redrafter.verify.verify`), emits every token distributed exactly as the target's own
sampling, whatever the drafter proposed.

The draws are keyed by position: a node draws by inverting its distribution's CDF at a uniform
number made from ``(seed, stream, position of the token it chooses)`` alone
(:func:`position_uniform`, :func:`inverse_cdf`). Nodes at one depth share their uniform, and only
one of them is on the accepted path, so every emitted token still gets a uniform of its own,
independent of all before it: the output is exactly distributed. And it is the very sequence
plain sampling with the same seed draws, whatever the tree, the drafter, the rows beside it, or
whether a step speculated at all (a server switches between speculative and plain steps as load
changes, and a seeded request still reproduces).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .errors import RedrafterError
from .models import hidden_to_logits


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, applied in the order transformers applies them: temperature, top-k, top-p.

    ``temperature == 0`` means greedy decoding; ``top_k == 0`` and ``top_p == 1`` disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise RedrafterError(f"temperature must be at least 0, got {self.temperature}")
        if self.top_k < 0:
            raise RedrafterError(f"top-k must be at least 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RedrafterError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``[..., V]`` logits -> the distribution that plain sampling with ``params`` draws from."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = scores.topk(params.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if params.top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        sorted_scores, order = scores.sort(dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - params.top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -torch.inf)
    return scores.softmax(dim=-1)


def exact_argmax(
    target: PreTrainedModel,
    hidden: torch.Tensor,
    candidates: int = 8,
    argmax_head: nn.Module | None = None,
    head: nn.Module | None = None,
) -> torch.Tensor:
    """The argmax of the target's head computed in float32: ``[..., d]`` hidden -> ``[...]`` ids.

    In bfloat16 the logits of a 49k-token head are rounded to steps of 0.125 at typical
    magnitudes, so exact ties are common, and a token tree (N queries) and a single token
    round differently: ties would then break differently and greedy output would depend on the
    tree. The ``candidates`` best bfloat16 logits are recomputed in float32 and the best wins.

    ``argmax_head``: a cheaper head (:class:`redrafter.quant.ArgmaxHead`: the file's own Q8_0 or
    4-bit values). One that :attr:`~redrafter.quant.ArgmaxHead.certifies` (w4a8) gives the argmax
    itself, for any number of rows: every logit its own could not rule out is computed in float32
    with the head's own weights, so no candidate count can leave the best out. Otherwise it gives
    the candidates where it :meth:`~redrafter.quant.ArgmaxHead.covers` ``hidden``, and the winner is
    still the float32 recomputation with the head's own weights.

    ``head``: the head's product elsewhere (:func:`redrafter.models.hidden_to_logits`), where
    ``argmax_head`` does not cover ``hidden``.
    """
    if getattr(argmax_head, "certifies", False):
        return argmax_head.argmax(hidden)
    if argmax_head is not None and argmax_head.covers(hidden):
        top = argmax_head.candidates(hidden, candidates)  # [..., k]
    else:
        logits = hidden_to_logits(target, hidden, head=head)
        if logits.dtype in (torch.float32, torch.float64):
            return logits.argmax(dim=-1)
        top = logits.topk(candidates, dim=-1).indices  # [..., k]
    own = target.get_output_embeddings()
    exact = (own.weight[top].float() @ hidden.float()[..., None])[..., 0]  # [..., k]
    if getattr(own, "bias", None) is not None:
        exact = exact + own.bias[top].float()
    return top.gather(-1, exact.argmax(dim=-1, keepdim=True))[..., 0]


def position_uniform(seed: int, stream: int, position: int) -> float:
    """A uniform number in [0, 1) that is a function of ``(seed, stream, position)`` alone (53 bits
    of their hash), so a position's draw is the same whichever step, tree or batch makes it."""
    key = hashlib.blake2b(f"{seed}:{stream}:{position}".encode(), digest_size=8).digest()
    return (int.from_bytes(key, "little") >> 11) / 2**53


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` distributions and ``[...]`` uniforms -> ``[...]`` token ids: the first token whose
    cumulative probability (float64) exceeds ``uniform`` times the total, an exact draw."""
    cdf = probs.double().cumsum(dim=-1)
    threshold = (uniform.double().to(cdf.device) * cdf[..., -1])[..., None]
    return torch.searchsorted(cdf, threshold, right=True)[..., 0].clamp(max=probs.shape[-1] - 1)


class TokenChooser:
    """Chooses the target's token at every node: argmax, or a position-keyed exact draw.

    ``argmax_head``: the greedy argmax's quick candidates (:func:`exact_argmax`); ``head``: the
    head's product computed elsewhere (:func:`redrafter.models.hidden_to_logits`), the same for every
    row and tree (a packed head, or :class:`redrafter.head.BFloat16Head`).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        params: SamplingParams,
        argmax_head: nn.Module | None = None,
        head: nn.Module | None = None,
    ) -> None:
        self.target, self.params, self.argmax_head, self.head = target, params, argmax_head, head
        # Without a seed, one drawn from torch's global generator (so torch.manual_seed fixes it).
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())

    def __call__(
        self,
        hidden: torch.Tensor,
        rows: list[int],
        nodes: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, N, d]`` final hidden states -> ``[B, N]`` token ids.

        ``rows``: each row's random stream (a row id); ``nodes``: ``[B]`` real slots per row (the
        first ones; None: all), the rest get -2, which no draft holds; ``positions``: ``[B, N]`` the
        position of the token each slot chooses (its own position plus one)."""
        if self.params.greedy:
            return exact_argmax(self.target, hidden, argmax_head=self.argmax_head, head=self.head)
        probs = probabilities(hidden_to_logits(self.target, hidden, head=self.head), self.params)
        counts = [hidden.shape[1]] * len(rows) if nodes is None else nodes.tolist()
        uniform = [
            [position_uniform(self.seed, stream, p) for p in row_positions]
            for stream, row_positions in zip(rows, positions.tolist(), strict=True)
        ]
        choice = inverse_cdf(probs, torch.tensor(uniform, dtype=torch.float64))  # [B, N]
        slots = torch.arange(choice.shape[1], device=choice.device)[None, :]
        return choice.masked_fill(slots >= torch.tensor(counts, device=choice.device)[:, None], -2)


class RowChooser:
    """The target's choice per tree node with each row's own settings and random stream (a server's
    requests: greedy and sampled rows side by side). Rows are named by the ids a
    :class:`~redrafter.decode.RunningBatch` gives them; :meth:`add` them before they decode."""

    def __init__(
        self, target: PreTrainedModel, argmax_head: nn.Module | None = None, head: nn.Module | None = None
    ) -> None:
        self.target, self.argmax_head, self.head = target, argmax_head, head
        self.rows: dict[int, TokenChooser] = {}

    def add(self, row: int, params: SamplingParams) -> None:
        self.rows[row] = TokenChooser(self.target, params, self.argmax_head, self.head)

    def remove(self, row: int) -> None:
        self.rows.pop(row, None)

    def __call__(
        self, hidden: torch.Tensor, rows: list[int], nodes: torch.Tensor | None, positions: torch.Tensor
    ) -> torch.Tensor:
        """``[B, N, d]`` final hidden states of rows ``rows`` -> ``[B, N]`` token ids.

        ``nodes``: ``[B]`` real tree slots per row (the first ones; the rest pad the batch);
        ``positions``: ``[B, N]`` the position each slot chooses. A sampled row's draws depend on
        its seed and positions only (stream 0: a request's own), so with a seed its output does
        not depend on the rows beside it. Padding slots get -2, which no draft holds.
        """
        choosers = [self.rows[row] for row in rows]
        if all(c.params.greedy for c in choosers):
            return exact_argmax(self.target, hidden, argmax_head=self.argmax_head, head=self.head)
        counts = [hidden.shape[1]] * len(rows) if nodes is None else nodes.tolist()
        choice = torch.full(hidden.shape[:2], -2, dtype=torch.long, device=hidden.device)
        for i, (chooser, count) in enumerate(zip(choosers, counts, strict=True)):
            one = torch.tensor([count], device=hidden.device)
            choice[i, :count] = chooser(hidden[i : i + 1, :count], [0], one, positions[i : i + 1, :count])[0]
        return choice
