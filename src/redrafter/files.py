"""Atomic file writes: a temporary file in the same folder, renamed over the target when complete."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The file gets the permissions a plain ``open(path, "w")`` would (``0o666`` less the umask), not
    the owner-only ones of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        plain_permissions(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def plain_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open(..., "w")`` or ``mkdir`` would (``0o666``/``0o777``, or
    ``0o777`` for an executable file, less the umask): temporary files and folders are owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o777 if os.path.isdir(path) or os.access(path, os.X_OK) else 0o666
    os.chmod(path, mode & ~umask)


def write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
