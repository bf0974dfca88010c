"""``redrafter distill``: a training corpus written by the target itself.

Prompts come from a file, or the target writes them (Magpie-style): a user turn sampled from the
chat template's empty user prefix, optionally begun with an *opener* ("Write a poem", "Solve",
"Imagine you are", ... one drawn per prompt from a list) that steers the requests toward the kinds
of task users ask for: writing, role-play, reasoning, maths, code, extraction, explanations.
Responses are the target's own greedy (or sampled) continuations, which is exactly what a drafter
for greedy decoding must predict.

With *tasks* (instruction templates holding ``{text}``: "Summarize the following text...",
"Translate into German:...", "Passage: ... Question: ...") the conversations work over a long given
input, as users' summarization, translation and passage-QA requests do: the target first answers
each prompt greedily, and that answer, its own text, becomes the ``{text}`` of a template drawn per
prompt; the stored conversation is the filled template and the target's answer to it. Nothing in
it comes from a benchmark or from outside the target.

Layout of ``DATA``:
- ``meta.json``: the model, the settings, and the totals so far;
- ``shard-00000.npz`` ...: ``np.savez_compressed`` arrays ``prompt_tokens``/``prompt_offsets``
  (templated prompts), ``response_tokens``/``response_offsets`` (as ``uint32`` concatenations
  with ``[n + 1]`` offsets) and ``user_texts``. Each shard is written to a temporary file and
  renamed, so an interrupted run loses at most the shard in progress and resumes after the last
  complete one (shard ``i`` is generated from seed ``seed + i``: resuming reproduces the run).
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import RedrafterError
from .files import atomic_write, write_json
from .prompts import BenchmarkGuard, read_prompts

SENTINEL = "\u2063REDRAFTER\u2063"
BUNDLED_OPENERS = Path(__file__).parent / "data" / "openers.txt"
BUNDLED_TASKS = Path(__file__).parent / "data" / "tasks.txt"


@dataclass
class DistillConfig:
    """Settings of a corpus; stored in ``meta.json`` and checked on resume."""

    model: str
    prompts: str | None = None
    num_prompts: int = 2048
    shard_size: int = 128
    batch_size: int = 32
    max_new_tokens: int = 256
    prompt_max_tokens: int = 48
    prompt_temperature: float = 1.0
    prompt_top_p: float = 0.98
    temperature: float = 0.0
    seed: int = 0
    dtype: str = "bfloat16"
    openers: list[str] | None = None
    tasks: list[str] | None = None


def read_openers(path: str) -> list[str]:
    """Openers of self-written prompts, one per line of ``path`` ('default': the bundled list)."""
    source = BUNDLED_OPENERS if path == "default" else Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RedrafterError(f"--openers {path}: cannot read it ({error})") from None
    openers = [line.strip() for line in lines if line.strip()]
    if not openers:
        raise RedrafterError(f"--openers {path}: no openers (one per line)")
    return openers


def read_tasks(path: str) -> list[str]:
    """Task templates, one per line of ``path`` ('default': the bundled list); each holds ``{text}``
    once, where the given input goes, and ``\\n`` for a line break."""
    source = BUNDLED_TASKS if path == "default" else Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RedrafterError(f"--tasks {path}: cannot read it ({error})") from None
    tasks = [line.strip().replace("\\n", "\n") for line in lines if line.strip()]
    if not tasks:
        raise RedrafterError(f"--tasks {path}: no task templates (one per line)")
    for number, task in enumerate(tasks, 1):
        if task.count("{text}") != 1:
            raise RedrafterError(f"--tasks {path}: template {number} must hold {{text}} exactly once: {task[:60]!r}")
    return tasks


def user_prefix(tokenizer) -> str:
    """The chat template's text up to where a user turn's content begins."""
    if not getattr(tokenizer, "chat_template", None):
        raise RedrafterError("self-written prompts need a chat template; give --prompts FILE instead")
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return text[: text.index(SENTINEL)]


def templated(tokenizer, user_text: str) -> list[int]:
    """Token ids of ``user_text`` as a chat prompt (generation prompt included); for a base model
    (a tokenizer without a chat template) the raw text, which the model continues."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(user_text)["input_ids"]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def is_degenerate(text: str) -> bool:
    """Empty, too short, or repetitive (few distinct words)."""
    words = re.findall(r"\w+", text.lower())
    return len(words) < 3 or len(set(words)) < 0.4 * len(words)


def is_looping(text: str, min_words: int = 20, min_unique: float = 0.7) -> bool:
    """Too short to work over, or repeating itself: under ``min_unique`` of its word 4-grams are
    distinct (a greedy answer that fell into a loop; :func:`is_degenerate` is for short prompts)."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return len(words) < min_words or len(set(grams)) < min_unique * len(grams)


def _left_padded(sequences: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


def _generate(model, sequences, pad, eos, max_new_tokens, temperature, top_p, generator_seed) -> list[list[int]]:
    """Batched generation; returns the new ids per sequence, cut after the first EOS."""
    ids, mask = _left_padded(sequences, pad, model.device)
    torch.manual_seed(generator_seed)
    sample = temperature > 0
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=0 if sample else None,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    results = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        results.append(row[:cut])
    return results


def make_batch(pairs: list, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [B, T]``, ``attention [B, T]`` and ``response_start [B]``."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    attention = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (prompt, response) in enumerate(pairs):
        seq = prompt + response
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    return ids, attention, torch.tensor([len(p) for p, _ in pairs])


class Corpus:
    """A distilled corpus folder: its shards and metadata."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-[0-9][0-9][0-9][0-9][0-9].npz"))

    def meta(self) -> dict:
        path = self.folder / "meta.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def conversations(self) -> list[tuple[list[int], list[int]]]:
        """All ``(prompt_ids, response_ids)`` pairs, shard by shard."""
        pairs = []
        for shard in self.shards:
            with np.load(shard) as data:
                prompts = np.split(data["prompt_tokens"], data["prompt_offsets"][1:-1])
                responses = np.split(data["response_tokens"], data["response_offsets"][1:-1])
            pairs.extend((p.tolist(), r.tolist()) for p, r in zip(prompts, responses, strict=True))
        return pairs

    def user_texts(self) -> list[str]:
        texts: list[str] = []
        for shard in self.shards:
            with np.load(shard) as data:
                texts.extend(str(t) for t in data["user_texts"])
        return texts


def _write_shard(path: Path, users: list[str], prompts: list[list[int]], responses: list[list[int]]) -> None:
    def pack(seqs):
        offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.uint32, count=int(offsets[-1]))
        return flat, offsets

    prompt_tokens, prompt_offsets = pack(prompts)
    response_tokens, response_offsets = pack(responses)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: numpy would append ".npz" to a name
            np.savez_compressed(
                handle,
                user_texts=np.array(users, dtype=str),
                prompt_tokens=prompt_tokens,
                prompt_offsets=prompt_offsets,
                response_tokens=response_tokens,
                response_offsets=response_offsets,
            )

    atomic_write(path, save)


def distill(
    config: DistillConfig, out: str | Path, model=None, tokenizer=None, progress: bool = True, device: str = "cpu"
) -> Corpus:
    """Build (or resume) the corpus in ``out``. ``model``/``tokenizer``: preloaded, else loaded from config
    onto ``device`` (which is not part of the corpus's settings: a run may resume on another device)."""
    corpus = Corpus(out)
    previous = corpus.meta().get("config")
    # A corpus may grow (more prompts); any other change would mix two different corpora. A setting
    # that an older corpus's meta.json lacks had its default value then (openers: none).
    settings, defaults = asdict(config), asdict(DistillConfig(model=config.model))
    changed = [k for k in settings if previous and k != "num_prompts" and previous.get(k, defaults[k]) != settings[k]]
    if changed:
        raise RedrafterError(f"{out} holds a corpus made with other settings ({', '.join(changed)}); use a new --out")
    guard = BenchmarkGuard.mt_bench()
    file_prompts = None
    if config.prompts is not None and config.openers:
        raise RedrafterError("openers begin self-written prompts: give --prompts FILE or --openers, not both")
    if config.prompts is not None:
        file_prompts = [p.text for p in read_prompts(config.prompts)]
        for number, text in enumerate(file_prompts, 1):
            if (match := guard.match(text)) is not None:
                raise RedrafterError(
                    f"{config.prompts}: prompt {number} is a near-duplicate of a benchmark prompt "
                    f"({match[:60]!r}...); benchmark prompts must not enter training data"
                )
    total = len(file_prompts) if file_prompts is not None else config.num_prompts
    num_shards = -(-total // config.shard_size)
    done_shards = len(corpus.shards)
    stats = corpus.meta().get("totals", {"conversations": 0, "response_tokens": 0, "seconds": 0.0})
    if done_shards >= num_shards:  # complete: no model (nor its device) needed
        _write_meta(corpus.folder, config, stats)
        return corpus
    if model is None:
        from .api import DTYPES
        from .models import load_target

        model, tokenizer = load_target(config.model, dtype=DTYPES[config.dtype], device=device)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tokenizer.eos_token_id])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    corpus.folder.mkdir(parents=True, exist_ok=True)  # once the model loaded: bad input leaves no folder
    seen = {" ".join(t.lower().split()) for t in corpus.user_texts()}
    prefix_ids = (
        None if file_prompts is not None else tokenizer(user_prefix(tokenizer), add_special_tokens=False)["input_ids"]
    )
    opener_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in config.openers or [""]]
    bar = tqdm(
        total=total,
        initial=min(total, done_shards * config.shard_size),
        unit="prompt",
        desc="distill",
        disable=not progress,
        dynamic_ncols=True,
    )
    for shard_index in range(done_shards, num_shards):
        start = time.perf_counter()
        want = min(config.shard_size, total - shard_index * config.shard_size)
        users: list[str] = []
        prompts: list[list[int]] = []
        responses: list[list[int]] = []
        attempt = 0
        requests: list[str] = []  # with tasks: self-written prompts gathered for the next batch,
        given: list[str] = []  # and templates filled with the target's answers to them
        while len(users) < want:
            seed = config.seed * 1_000_003 + shard_index * 1009 + attempt
            attempt += 1
            need = min(config.batch_size, want - len(users))
            if file_prompts is not None:
                offset = shard_index * config.shard_size + len(users)
                batch_users = file_prompts[offset : offset + need]
            else:
                if attempt > 50 * (want // config.batch_size + 1):
                    raise RedrafterError("the model keeps writing unusable prompts; give --prompts FILE instead")
                draw = random.Random(seed)
                begun = [draw.randrange(len(opener_ids)) for _ in range(config.batch_size)]  # opener per row
                drafts = _generate(
                    model,
                    [prefix_ids + opener_ids[o] for o in begun],
                    pad,
                    eos,
                    config.prompt_max_tokens,
                    config.prompt_temperature,
                    config.prompt_top_p,
                    seed,
                )
                batch_users = []
                for opener, ids in zip(begun, drafts, strict=True):
                    if not ids or ids[-1] not in eos:  # ran out of room: an unfinished request
                        continue
                    text = tokenizer.decode(opener_ids[opener] + ids[:-1], skip_special_tokens=True).strip()
                    key = " ".join(text.lower().split())
                    if is_degenerate(text) or key in seen or guard.match(text) is not None:
                        continue
                    seen.add(key)
                    batch_users.append(text)
                batch_users = batch_users[:need]
                if config.tasks:  # a full batch of requests before the long generations
                    requests += batch_users
                    if len(requests) < need:
                        continue
                    batch_users, requests = requests[:need], []
                if not batch_users:
                    continue
            if config.tasks:  # and a full batch of given inputs: a looping answer is dropped
                given += _over_given_inputs(
                    model, tokenizer, batch_users, config, pad, eos, seed + 3, keep_all=file_prompts is not None
                )
                if len(given) < need:
                    continue
                batch_users, given = given[:need], given[need:]
            batch_prompts = [templated(tokenizer, u) for u in batch_users]
            batch_responses = _generate(
                model, batch_prompts, pad, eos, config.max_new_tokens, config.temperature, 1.0, seed + 7
            )
            users += batch_users
            prompts += batch_prompts
            responses += batch_responses
            bar.update(len(batch_users))
            stats["response_tokens"] += sum(len(r) for r in batch_responses)
            stats["conversations"] += len(batch_users)
            elapsed = stats["seconds"] + time.perf_counter() - start
            bar.set_postfix_str(f"{stats['response_tokens'] / max(elapsed, 1e-9):.0f} tok/s")
        _write_shard(corpus.folder / f"shard-{shard_index:05d}.npz", users, prompts, responses)
        stats["seconds"] += time.perf_counter() - start
        _write_meta(corpus.folder, config, stats)
    bar.close()
    _write_meta(corpus.folder, config, stats)
    return corpus


def _over_given_inputs(
    model, tokenizer, users: list[str], config: DistillConfig, pad: int, eos: list[int], seed: int, keep_all: bool
) -> list[str]:
    """The target's greedy answers to ``users``, each made the ``{text}`` of a task template drawn
    per row; a short or looping answer (:func:`is_looping`) is dropped unless ``keep_all``."""
    prompts = [templated(tokenizer, u) for u in users]
    answers = _generate(model, prompts, pad, eos, config.max_new_tokens, 0.0, 1.0, seed)
    draw = random.Random(seed)
    filled = []
    for ids in answers:
        text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True).strip()
        task = config.tasks[draw.randrange(len(config.tasks))]
        if keep_all or not is_looping(text):
            filled.append(task.replace("{text}", text))
    return filled


def _write_meta(folder: Path, config: DistillConfig, totals: dict) -> None:
    write_json(folder / "meta.json", {"format": "redrafter-corpus-1", "config": asdict(config), "totals": totals})
