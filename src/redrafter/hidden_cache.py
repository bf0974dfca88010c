"""The frozen target's hidden states of a corpus, computed once and kept on disk.

Training runs many epochs over the same conversations; the target's forward costs about as much
as the drafter's forward and backward, so computing it once saves half or more of every later
epoch. Layout of the folder: ``states.bin`` (every token's features, ``[tokens, (1 + n) d]`` in
the target's dtype, as raw bytes in a memory map: the final hidden state, then the outputs of the
``n`` layers a drafter fuses, :func:`redrafter.models.decoder_features`) and ``meta.json`` (a
signature of the corpus, model and layers, and how many conversations are done: an interrupted
build resumes there).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .distill import make_batch
from .errors import RedrafterError
from .files import write_json
from .models import decoder_features, decoder_of


def _digest(target, layers: tuple[int, ...]) -> hashlib._Hash:
    """A fresh signature digest of the model (name, dtype, width) and the captured layers."""
    fused = f"|layers={','.join(map(str, layers))}" if layers else ""
    return hashlib.sha256(f"{target.config._name_or_path}|{target.dtype}|{target.config.hidden_size}{fused}".encode())


def _update(digest: hashlib._Hash, pairs: list) -> hashlib._Hash:
    """Feed ``pairs``' tokens to ``digest`` (in place) and return it: the signature of a corpus
    prefix changes when any token, the model or its dtype changes."""
    for prompt, response in pairs:
        digest.update(np.asarray(prompt + response + [-1], dtype=np.int64).tobytes())
    return digest


class HiddenStates:
    """Features ``[len(prompt) + len(response), (1 + n) d]`` of each conversation of ``pairs``.

    Args:
        folder: where the cache lives (created).
        pairs: the (prompt ids, response ids) conversations, in a fixed order.
        target: the frozen target.
        batch_size: conversations per forward while building.
        layers: the ``n`` decoder layers whose outputs follow the final hidden state.
    """

    def __init__(
        self,
        folder: str | Path,
        pairs: list,
        target,
        batch_size: int = 8,
        progress: bool = True,
        layers: tuple[int, ...] = (),
    ) -> None:
        self.folder, self.pairs, self.target, self.layers = Path(folder), pairs, target, tuple(layers)
        self.dtype = target.dtype
        features = (1 + len(self.layers)) * target.config.hidden_size
        self.width = features * torch.finfo(self.dtype).bits // 8  # bytes per token
        lengths = np.array([len(p) + len(r) for p, r in pairs], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        done = meta.get("done", 0)
        tokens = max(1, int(self.offsets[-1]))
        path = self.folder / "states.bin"
        self._digest = _update(_digest(target, self.layers), pairs[:done])  # of the conversations built so far
        if done > len(pairs) or meta.get("signature") != self._digest.hexdigest()[:20] or not path.is_file():
            done = 0  # another corpus or model: start over
            self._digest = _digest(target, self.layers)
            path.unlink(missing_ok=True)
        with open(path, "ab") as handle:  # create, or grow to the current corpus (keeps the built part)
            handle.truncate(tokens * self.width)
        meta = {"signature": self._digest.hexdigest()[:20], "conversations": len(pairs), "done": done}
        write_json(meta_path, meta)
        self.states = np.memmap(path, dtype=np.uint8, mode="r+", shape=(tokens, self.width))
        self._build(meta, batch_size, progress)

    @torch.no_grad()
    def _build(self, meta: dict, batch_size: int, progress: bool) -> None:
        decoder = decoder_of(self.target)
        bar = tqdm(
            total=len(self.pairs),
            initial=meta["done"],
            desc="hidden states",
            unit="conv",
            disable=not progress or meta["done"] == len(self.pairs),
        )
        for start in range(meta["done"], len(self.pairs), batch_size):
            chunk = self.pairs[start : start + batch_size]
            ids, attention, _ = make_batch(chunk, pad=0)
            device = self.target.device
            hidden = decoder_features(
                decoder, self.layers, input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False
            ).cpu()
            for row, index in enumerate(range(start, start + len(chunk))):
                length = int(self.offsets[index + 1] - self.offsets[index])
                raw = hidden[row, :length].contiguous().view(torch.uint8).numpy()
                self.states[self.offsets[index] : self.offsets[index + 1]] = raw
            self.states.flush()
            meta["done"] = start + len(chunk)
            meta["signature"] = _update(self._digest, chunk).hexdigest()[:20]  # grown, not recomputed
            write_json(self.folder / "meta.json", meta)
            bar.update(len(chunk))
        bar.close()

    def batch(self, indices: list[int]) -> torch.Tensor:
        """Right-padded ``[len(indices), T, (1 + n) d]`` features (zeros past each conversation)."""
        if not indices:
            raise RedrafterError("no conversations")
        rows = [
            torch.from_numpy(np.array(self.states[self.offsets[i] : self.offsets[i + 1]])).view(self.dtype)
            for i in indices
        ]
        out = torch.zeros(len(rows), max(r.shape[0] for r in rows), rows[0].shape[1], dtype=self.dtype)
        for k, row in enumerate(rows):
            out[k, : row.shape[0]] = row
        return out.to(self.target.device)
