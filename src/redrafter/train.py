"""``redrafter train``: fit a drafter to a frozen target on a distilled corpus.

At every response position ``t`` of a conversation ``x`` the drafter sees the target's hidden state
``h_t`` (after the final norm; with fused layers, also those layers' outputs there); draft step
``i`` (``0 <= i < S``) is fed ``E(x_{t+1+i})`` and must predict ``x_{t+2+i}``. Loss: the sum over
steps of the cross-entropy on the corpus tokens (the target's own greedy output), plus optionally
``kd_weight`` times the KL divergence from the target's own next-token distribution at temperature
``kd_temperature`` (restricted to the draft vocabulary). Hidden states are computed on the fly by
the frozen target, so memory stays small.

Runs as one CPU process by default and unchanged under ``accelerate launch`` (DDP): only the
drafter is wrapped; each process runs the target on its share of the batch.

Checkpoints (``OUT/checkpoint``) hold the drafter, optimizer, scheduler, step and RNG states;
the data order is a function of (seed, epoch), so ``--resume`` continues the very same run.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .beam_search import beam_search
from .distill import Corpus, make_batch
from .drafter import DrafterConfig, RecurrentDrafter
from .errors import RedrafterError
from .files import atomic_write
from .hidden_cache import HiddenStates
from .models import decoder_features, decoder_of


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (stored with the checkpoints)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    draft_steps: int = 4
    draft_vocab: int = 8192
    exit_dim: int | None = None
    num_draft_layers: int = 2
    rnn: bool = True
    tied_head: bool = False
    rnn_cell: str = "reference"
    fused_layers: list[int] | None = None
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    eval_every: int = 200
    checkpoint_every: int = 100
    log_every: int = 10
    heldout_every: int = 50
    eval_positions: int = 512
    eval_beams: int = 4
    seed: int = 0
    autocast: bool = True
    position_fraction: float = 1.0


def split_heldout(count: int, every: int) -> tuple[list[int], list[int]]:
    """Indices of training and held-out conversations: every ``every``-th one is held out."""
    train = [i for i in range(count) if i % every != every - 1]
    heldout = [i for i in range(count) if i % every == every - 1]
    return train, heldout


def choose_draft_vocab(pairs: list, vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent response tokens (``size == 0``: the full vocabulary)."""
    if size <= 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = Counter(t for _, response in pairs for t in response)
    common = [t for t, _ in counts.most_common(size)]
    chosen = set(common)
    rest = [t for t in range(vocab_size) if t not in chosen][: size - len(common)]
    return torch.tensor(sorted(common + rest))


def coverage(pairs: list, draft_vocab: torch.Tensor) -> float:
    """Share of response tokens inside the draft vocabulary."""
    vocab = set(draft_vocab.tolist())
    total = sum(len(r) for _, r in pairs)
    return sum(t in vocab for _, r in pairs for t in r) / max(1, total)


def draft_targets(
    ids: torch.Tensor, attention: torch.Tensor, response_start: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and labels of every draft step at every position.

    Returns ``inputs [B, T, S]`` (``x_{t+1+i}``), ``labels [B, T, S]`` (``x_{t+2+i}``) and ``valid
    [B, T, S]``: the label is a real response token and ``h_t`` is at the prompt's end or later.
    """
    batch, width = ids.shape
    offsets = (torch.arange(width)[:, None] + torch.arange(steps)[None, :]).expand(batch, -1, -1)  # t + i
    inputs = ids.gather(1, (offsets + 1).clamp(max=width - 1).reshape(batch, -1)).reshape(batch, width, steps)
    labels = ids.gather(1, (offsets + 2).clamp(max=width - 1).reshape(batch, -1)).reshape(batch, width, steps)
    lengths = attention.sum(dim=1)[:, None, None]
    valid = (offsets + 2 < lengths) & (torch.arange(width)[None, :, None] >= response_start[:, None, None] - 1)
    return inputs, labels, valid


# ``(positions in the pairs, ids [B, T], attention [B, T]) -> [B, T, (1 + n) d]``: the frozen target's
# features of a batch of the pairs evaluated (Trainer.target_states, or a hidden-state cache).
TargetStates = Callable[[list[int], torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate_drafter(drafter: RecurrentDrafter, pairs: list, states: TargetStates, config: TrainConfig) -> dict:
    """Teacher-forced top-1 accuracy per draft step on ``pairs``, and simulated tokens per step.

    ``drafter``: float, attached to the target's embeddings (:meth:`RecurrentDrafter.attach`).
    ``states``: the target's features of a batch of ``pairs`` (:data:`TargetStates`). ``config``: its
    ``draft_steps``, ``batch_size``, ``eval_positions`` and ``eval_beams``.

    ``tokens_per_step``: at sampled positions (``eval_positions`` of them), beam search drafts
    ``eval_beams`` beams of ``draft_steps + 1`` tokens from ``(h_t, x_{t+1})``; the longest prefix that
    matches the corpus continuation (the target's greedy output) is accepted, plus the bonus token.
    ``tokens_per_step_walk``: the same drafts, but along each answer as the decode loop walks it (from
    the prompt's end, jump past what a step accepts). It is the lower and more honest of the two: the
    loop spends more steps where drafting is hard, a position average weights every position alike.
    """
    training = drafter.training
    drafter.eval()
    steps = config.draft_steps
    correct, counted, accepted, walked = torch.zeros(steps), torch.zeros(steps), [], []
    generator = torch.Generator().manual_seed(1234)
    budget = config.eval_positions
    for start in range(0, len(pairs), config.batch_size):
        batch = list(range(start, min(start + config.batch_size, len(pairs))))
        ids, attention, response_start = make_batch([pairs[i] for i in batch], pad=0)
        hidden = states(batch, ids, attention).float()
        inputs, labels, valid = draft_targets(ids, attention, response_start, steps)
        logits = drafter(hidden, inputs.to(hidden.device))
        predicted = drafter.to_target_ids(logits.argmax(-1)).cpu()
        correct += ((predicted == labels) & valid).sum((0, 1))
        counted += valid.sum((0, 1))
        # Simulated acceptance at positions with a full continuation.
        rows, positions = valid.all(dim=2).nonzero(as_tuple=True)
        if budget > 0 and len(rows):
            pick = torch.randperm(len(rows), generator=generator)[:budget]
            rows, positions = rows[pick], positions[pick]
            first = inputs[rows, positions, 0].to(hidden.device)
            beams = beam_search(drafter, hidden[rows, positions], first, config.eval_beams, steps + 1).cpu()
            truth = labels[rows, positions]  # [P, S]
            match = (beams[:, :, 1:] == truth[:, None, :]).long().cumprod(-1).sum(-1)  # [P, W]
            accepted += (match.max(dim=1).values + 1).tolist()
            budget -= len(rows)
        full = valid.all(dim=2)
        walked += walk_answers(drafter, hidden, inputs, labels, full, response_start, attention.sum(1), config)
    drafter.train(training)
    accuracy = (correct / counted.clamp(min=1)).tolist()
    return {
        "accuracy": [round(a, 4) for a in accuracy],
        "tokens_per_step": round(float(np.mean(accepted)), 4) if accepted else None,
        "tokens_per_step_walk": round(float(np.mean(walked)), 4) if walked else None,
        "positions": int(counted[0]),
    }


def walk_answers(
    drafter: RecurrentDrafter,
    hidden: torch.Tensor,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    full: torch.Tensor,
    response_start: torch.Tensor,
    lengths: torch.Tensor,
    config: TrainConfig,
) -> list[int]:
    """Tokens emitted by each simulated decode step along the answers of one batch.

    ``hidden [B, T, d]``, ``inputs``/``labels [B, T, S]``, ``full [B, T]`` (a whole continuation
    is known there), ``response_start``/``lengths [B]``. Row ``b`` starts at ``t = response_start
    - 1`` (the prompt's last position; ``x_{t+1}`` is the answer's first token) and moves by
    ``a + 1``; a step at the answer's end emits only up to its last token, as the loop does. Beam
    search drafts ``config.eval_beams`` beams of ``config.draft_steps + 1`` tokens.
    """
    batch, width = full.shape
    position = (response_start - 1).clamp(min=0)
    emitted: list[int] = []
    rows = torch.arange(batch)
    while True:
        active = rows[(position < width) & full[rows, position.clamp(max=width - 1)]]
        if len(active) == 0:
            return emitted
        t = position[active]
        beams = beam_search(
            drafter,
            hidden[active, t],
            inputs[active, t, 0].to(hidden.device),
            config.eval_beams,
            config.draft_steps + 1,
        ).cpu()
        match = (beams[:, :, 1:] == labels[active, t][:, None, :]).long().cumprod(-1).sum(-1)  # [A, W]
        step = torch.minimum(match.max(dim=1).values + 1, lengths[active] - 2 - t)
        emitted += step.tolist()
        position[active] = t + step


class Trainer:
    """Trains ``drafter`` against the frozen ``target`` on (prompt ids, response ids) pairs.

    Every ``config.heldout_every``-th conversation is held out for evaluation.
    """

    def __init__(
        self,
        target,
        config: TrainConfig,
        pairs: list,
        out: str | Path,
        drafter: RecurrentDrafter | None = None,
        progress: bool = True,
        hidden_cache: str | Path | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=target.device.type == "cpu")
        self.target, self.config, self.out = target.eval().requires_grad_(False), config, Path(out)
        self.decoder = decoder_of(target)
        self.progress = progress and self.accelerator.is_main_process
        # Conversations in corpus order; the split and the hidden-state cache index into them.
        self.pairs = pairs
        self.train_idx, self.heldout_idx = split_heldout(len(pairs), config.heldout_every)
        train_pairs = [pairs[i] for i in self.train_idx]
        if drafter is None:
            torch.manual_seed(config.seed)
            draft_vocab = choose_draft_vocab(train_pairs, target.config.vocab_size, config.draft_vocab)
            drafter = RecurrentDrafter(
                DrafterConfig(
                    hidden_size=target.config.hidden_size,
                    vocab_size=target.config.vocab_size,
                    exit_dim=config.exit_dim,
                    num_draft_layers=config.num_draft_layers,
                    rnn=config.rnn,
                    tied_head=config.tied_head,
                    rnn_cell=config.rnn_cell,
                    fused_layers=config.fused_layers,
                    draft_vocab_size=len(draft_vocab),
                )
            )
            drafter.draft_vocab.copy_(draft_vocab)
        drafter.check_fits(target.config.hidden_size, target.config.vocab_size, target.config.num_hidden_layers)
        self.layers = drafter.target_layers  # whose outputs the drafter reads besides the final state
        self.states = None
        if hidden_cache is not None:
            with self.accelerator.main_process_first():
                self.states = HiddenStates(
                    hidden_cache, self.pairs, self.target, config.batch_size, self.progress, self.layers
                )
        drafter = drafter.float().attach(target.get_input_embeddings(), target.get_output_embeddings())
        # Target ids -> draft ids (-1 outside the draft vocabulary).
        self.to_draft = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
        self.to_draft[drafter.draft_vocab] = torch.arange(len(drafter.draft_vocab))
        decay = [p for n, p in drafter.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in drafter.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.drafter, self.optimizer, self.scheduler = self.accelerator.prepare(drafter, optimizer, scheduler)
        self.step = 0
        self.last_eval: dict | None = None  # the latest evaluation of this process's run, if any

    # -- schedule and data ----------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warmup, total = self.config.warmup, self.config.steps
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def batch_for_step(self, step: int) -> list[int]:
        """This process's share of the conversations of ``step`` (order fixed by seed and epoch)."""
        size = self.config.batch_size
        per_epoch = max(1, len(self.train_idx) // size)
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(len(self.train_idx), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        chosen = order[index * size : (index + 1) * size].tolist()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        return [self.train_idx[i] for i in chosen[rank::world]]

    @torch.no_grad()
    def target_states(self, indices: list[int], ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``[B, T, (1 + n) d]`` features of the frozen target: its hidden states after the final
        norm, then the outputs of the layers the drafter fuses."""
        if self.states is not None:
            return self.states.batch(indices)
        device = self.target.device
        return decoder_features(
            self.decoder, self.layers, input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
        )

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, indices: list[int], step: int = 0) -> tuple[torch.Tensor, dict]:
        """Summed per-step cross-entropy (+ KD) over the valid positions of conversations ``indices``.

        With ``position_fraction < 1`` a random share of the positions is used (fixed by seed and
        ``step``): neighbouring positions of one answer teach much the same, so this trades little
        signal for a proportional cut of the drafter's forward and backward.
        """
        config = self.config
        ids, attention, response_start = make_batch([self.pairs[i] for i in indices], pad=0)
        hidden = self.target_states(indices, ids, attention)
        inputs, labels, valid = draft_targets(ids, attention, response_start, config.draft_steps)
        draft_labels = self.to_draft[labels]
        valid &= draft_labels >= 0
        rows, positions = valid.any(dim=2).nonzero(as_tuple=True)  # only positions with a label
        if config.position_fraction < 1:
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            keep = torch.randperm(len(rows), generator=generator)[: max(1, int(len(rows) * config.position_fraction))]
            rows, positions = rows[keep], positions[keep]
        device = self.target.device
        h = hidden[rows, positions].float()[None]  # [1, P, d]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast)
        with autocast:
            logits = self.drafter(h, inputs[rows, positions].to(device)[None])[0].float()  # [P, S, K]
        step_labels = draft_labels[rows, positions].to(device)
        step_valid = valid[rows, positions].to(device)
        ce = F.cross_entropy(logits.transpose(1, 2), step_labels.clamp(min=0), reduction="none")  # [P, S]
        per_step = (ce * step_valid).sum(0) / step_valid.sum(0).clamp(min=1)
        loss = per_step.sum()
        metrics = {f"ce_{i}": float(v) for i, v in enumerate(per_step.detach())}
        if config.kd_weight > 0:
            # The target's distribution for x_{t+2+i} is its output at position t+1+i.
            source = (positions[:, None] + 1 + torch.arange(config.draft_steps)).clamp(max=ids.shape[1] - 1)
            teacher_hidden = hidden[rows[:, None], source][..., : self.target.config.hidden_size]  # [P, S, d]
            head = self.target.get_output_embeddings().weight[self.unwrapped.draft_vocab]
            with torch.no_grad():
                teacher = (teacher_hidden.float() @ head.float().T / config.kd_temperature).log_softmax(-1)
            student = (logits / config.kd_temperature).log_softmax(-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [P, S]
            kd = ((kl * step_valid).sum(0) / step_valid.sum(0).clamp(min=1)).sum() * config.kd_temperature**2
            loss = loss + config.kd_weight * kd
            metrics["kd"] = float(kd.detach())
        metrics["loss"] = float(loss.detach())
        metrics["positions"] = int(step_valid.sum())
        return loss, metrics

    @property
    def unwrapped(self) -> RecurrentDrafter:
        return self.accelerator.unwrap_model(self.drafter)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """:func:`evaluate_drafter` on the held-out conversations."""
        heldout = self.heldout_idx

        def states(batch: list[int], ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
            return self.target_states([heldout[i] for i in batch], ids, attention)

        return evaluate_drafter(self.unwrapped, [self.pairs[i] for i in heldout], states, self.config)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        folder = self.out / "checkpoint"
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "config": asdict(self.config),
            "drafter": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        atomic_write(folder / "state.pt", lambda p: torch.save(state, p))
        self.unwrapped.save_pretrained(self.out)

    def load_checkpoint(self) -> None:
        path = self.out / "checkpoint" / "state.pt"
        if not path.is_file():
            raise RedrafterError(f"nothing to resume: {path} does not exist")
        state = torch.load(path, weights_only=False)
        if state["config"] != asdict(self.config):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(self.config).get(k))
            raise RedrafterError(f"the checkpoint was made with other settings ({', '.join(changed)})")
        self.unwrapped.load_state_dict(state["drafter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # -- the loop -------------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> RecurrentDrafter:
        """Train until ``config.steps`` (or ``stop_after`` steps, for tests); returns the drafter."""
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        end = config.steps if stop_after is None else min(config.steps, self.step + stop_after)
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.drafter.train()
        started = time.perf_counter()
        while self.step < end:
            loss, metrics = self.loss(self.batch_for_step(self.step), self.step)
            self.optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(loss)
            self.accelerator.clip_grad_norm_(self.drafter.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {metrics['loss']:.3f}")
            if self.step % config.log_every == 0 or self.step == end:
                self.log(
                    {
                        "step": self.step,
                        "lr": self.scheduler.get_last_lr()[0],
                        "seconds": round(time.perf_counter() - started, 2),
                        **metrics,
                    }
                )
            if self.step % config.checkpoint_every == 0 or self.step == end:  # before a long evaluation
                self.save_checkpoint()
            if self.step % config.eval_every == 0 or self.step == config.steps:
                self.last_eval = self.evaluate()
                self.log({"step": self.step, "eval": self.last_eval})
        bar.close()
        return self.unwrapped


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> None:
    """Loss and held-out accuracy / tokens per step curves from ``metrics.jsonl``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="step", ylabel="training loss (sum over draft steps)", title="loss")
    if evals:
        steps = [r["step"] for r in evals]
        for i in range(len(evals[0]["eval"]["accuracy"])):
            right.plot(steps, [r["eval"]["accuracy"][i] for r in evals], marker="o", label=f"draft step {i + 1}")
        right.set(xlabel="step", ylabel="held-out top-1 accuracy", title="held-out accuracy", ylim=(0, 1))
        right.legend()
        if evals[0]["eval"]["tokens_per_step"] is not None:
            twin = right.twinx()
            twin.plot(steps, [r["eval"]["tokens_per_step"] for r in evals], "k--", label="tokens/step")
            twin.set_ylabel("simulated tokens per step (dashed)")
    figure.tight_layout()
    atomic_write(Path(png_path), lambda p: figure.savefig(p, format="png", dpi=100))
    plt.close(figure)


def load_corpora(folders: list[str]) -> list:
    """All conversations of the given corpus folders (duplicate prompts across folders dropped)."""
    pairs, seen = [], set()
    for folder in folders:
        corpus = Corpus(folder)
        if not corpus.shards:
            raise RedrafterError(f"{folder}: no corpus shards (make one with redrafter distill)")
        for pair in corpus.conversations():
            key = tuple(pair[0])
            if key not in seen:
                seen.add(key)
                pairs.append(pair)
    return pairs
