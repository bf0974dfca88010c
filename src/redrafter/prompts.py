"""Prompt files and the benchmark guard.

Accepted JSONL lines: ``{"prompt": str}``, Spec-Bench/MT-Bench ``{"turns": [str, ...]}`` (the first
turn is used; ``question_id`` and ``category`` are kept when present), or ShareGPT
``{"conversations": [{"from": "human", "value": str}, ...]}`` (the first human turn).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

from .errors import RedrafterError

BUNDLED_MT_BENCH = Path(__file__).parent / "data" / "mt_bench.jsonl"


@dataclass
class Prompt:
    """One prompt of a prompt file."""

    text: str
    category: str = "default"
    question_id: str | int | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; raise :class:`RedrafterError` naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise RedrafterError(f"prompt file not found: {path}")
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise RedrafterError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            text = _prompt_text(row)
            if text is None:
                raise RedrafterError(
                    f"{path}:{number}: expected a non-empty 'prompt', 'turns' or ShareGPT 'conversations'"
                )
            prompts.append(Prompt(text, str(row.get("category", "default")), row.get("question_id")))
    if not prompts:
        raise RedrafterError(f"{path}: no prompts")
    return prompts


def per_category(prompts: list[Prompt], count: int) -> list[Prompt]:
    """The first ``count`` prompts of each category, in file order (a fixed stratified subset)."""
    taken: dict[str, int] = {}
    chosen = []
    for prompt in prompts:
        if taken.get(prompt.category, 0) < count:
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            chosen.append(prompt)
    return chosen


def _prompt_text(row: object) -> str | None:
    if not isinstance(row, dict):
        return None
    text = row.get("prompt")
    if text is None and isinstance(row.get("turns"), list) and row["turns"]:
        text = row["turns"][0]
    if text is None and isinstance(row.get("conversations"), list):
        human = [t for t in row["conversations"] if isinstance(t, dict) and t.get("from") in ("human", "user")]
        text = human[0].get("value") if human else None
    return text if isinstance(text, str) and text.strip() else None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _shingles(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


class BenchmarkGuard:
    """Tells whether a text is a near-duplicate of a benchmark prompt.

    Near-duplicate: half of the shorter text's word 4-grams occur in the other, or (for short
    texts) a character similarity of at least 0.85 after normalisation.
    """

    def __init__(self, benchmark_texts: list[str]) -> None:
        self.texts = [" ".join(_words(t)) for t in benchmark_texts]
        self.shingles = [_shingles(t.split()) for t in self.texts]

    @classmethod
    def mt_bench(cls) -> BenchmarkGuard:
        """Guard against every turn of the bundled MT-Bench questions."""
        rows = [json.loads(line) for line in BUNDLED_MT_BENCH.read_text().splitlines() if line.strip()]
        return cls([turn for row in rows for turn in row["turns"]])

    def match(self, text: str) -> str | None:
        """The benchmark text that ``text`` nearly duplicates, or None."""
        words = _words(text)
        normal = " ".join(words)
        mine = _shingles(words)
        for other, theirs in zip(self.texts, self.shingles, strict=True):
            shared = len(mine & theirs) / max(1, min(len(mine), len(theirs)))
            if shared >= 0.5 or (min(len(normal), len(other)) < 80 and _similar(normal, other)):
                return other
        return None


def _similar(a: str, b: str) -> bool:
    return SequenceMatcher(None, a, b).ratio() >= 0.85
