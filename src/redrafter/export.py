"""Export a drafter to the checkpoint layout Apple's code and TensorRT-LLM's converter read.

The reference layout (``../shared/DESIGN.md``) is a folder with ``config.json`` (the fields of Apple's
``DrafterConfig``) and ``model.safetensors`` holding ``rnn_w.weight``, ``rnn_u.*`` (with the RNN),
``input_proj.*`` (when ``exit_dim != 2 d``), ``lm_head.{i}.linear.*`` (``i < N``) and
``lm_head.{N}.weight``, a full-vocabulary ``[V, exit_dim]`` matrix. Nothing else: no
``draft_vocab``, no n-gram table, no lookup beam; both engines draft from the beams alone.

Our drafters may hold a reduced or tied head; export expands it to the full vocabulary:

- a tied head becomes ``E_out @ P`` (the target's ``[V, d]`` output embedding times the learned
  ``[d, exit_dim]`` projection): every row is the one the drafter would have had with a full
  vocabulary, so the exported drafter may now draft tokens the reduced one could not;
- an untied reduced head keeps its ``K`` rows at their target ids and gets zero rows elsewhere: a
  zero row's logit is 0, so drafts can change where the drafter's own logits are low.

Each engine runs one RNN cell (``apple``: ``reference``, ``trtllm``: ``trtllm``); a drafter is
exported for the engine whose cell it was trained with, unless the caller allows the mismatch.
The folder is written whole into a temporary sibling and renamed into place.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .drafter import MODEL_TYPE, DrafterError, RecurrentDrafter
from .files import plain_permissions

FORMATS = ("apple", "trtllm")
ENGINE_CELL = {"apple": "reference", "trtllm": "trtllm"}
ENGINE_NAME = {"apple": "Apple's ml-recurrent-drafter", "trtllm": "TensorRT-LLM"}
# Measured in docs/rnn-cell (24 MT-Bench prompts, the shipped drafter's own beams): what running a
# drafter under the other engine's cell costs.
CELL_MISMATCH_COST = (
    "the shipped drafter replays 1.65 tokens per step from its beams under the other cell, 2.09 under its own"
)
DTYPE_FLAGS = {  # our dtype name -> (TensorRT-LLM's --dtype, Apple's --dtype)
    "float64": ("float32", "fp32"),  # the engines' widest
    "float32": ("float32", "fp32"),
    "float16": ("float16", "fp16"),
    "bfloat16": ("bfloat16", "bf16"),
}


@dataclass
class ExportResult:
    """What :func:`export_drafter` wrote.

    Attributes:
        folder: the exported folder.
        tensors: ``{name: shape}`` of ``model.safetensors``.
        head_rows_added: vocabulary rows the exported head has that the drafter's head had not
            (``V - K``; 0 for a full-vocabulary drafter).
        zero_rows: whether those rows are zero (an untied reduced head) rather than computed
            from the target's output embedding (a tied head).
        base_model: the target's Hugging Face folder the commands use (written into the export
            for a GGUF target), or None when no target was given.
    """

    folder: Path
    tensors: dict[str, list[int]]
    head_rows_added: int
    zero_rows: bool
    base_model: Path | None


def check_export(
    drafter: RecurrentDrafter, fmt: str, out: Path, force: bool, allow_cell_mismatch: bool, has_target: bool
) -> None:
    """Refuse, before any slow work, what :func:`export_drafter` cannot write faithfully."""
    if fmt not in FORMATS:
        raise DrafterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise DrafterError(f"{out} exists and is not empty: choose another --out or pass --force")
    c = drafter.config
    if c.fused_layers:
        raise DrafterError(
            f"this drafter fuses target layers {c.fused_layers}; the reference layout that Apple's code and "
            "TensorRT-LLM read has only the final hidden state, so it cannot be exported"
        )
    if c.rnn and c.rnn_cell != ENGINE_CELL[fmt] and not allow_cell_mismatch:
        raise DrafterError(
            f"this drafter was trained with the {c.rnn_cell} RNN cell but {ENGINE_NAME[fmt]} runs the "
            f"{ENGINE_CELL[fmt]} cell, so it would draft other tokens there ({CELL_MISMATCH_COST}); train one for it "
            f"(redrafter train --init DRAFTER --rnn-cell {ENGINE_CELL[fmt]} ...) or pass --allow-cell-mismatch"
        )
    if c.tied_head and not has_target:
        raise DrafterError(
            "this drafter's head is tied to the target's output embedding: give the target with --model "
            "('default' for the shipped drafter) to write its full-vocabulary head"
        )


def reference_tensors(drafter: RecurrentDrafter, output_embedding: torch.Tensor | None) -> tuple[dict, int, bool]:
    """The drafter's tensors in the reference layout, with a full-vocabulary head.

    Args:
        drafter: the drafter (any head).
        output_embedding: ``[V, d]`` the target's output embedding (needed for a tied head).
    Returns:
        ``({name: tensor}, head_rows_added, zero_rows)``; the head ``lm_head.{N}.weight`` is
        ``[V, exit_dim]``, in float32 or the drafter's dtype if wider.
    """
    c = drafter.config
    last = f"lm_head.{c.num_draft_layers}.weight"
    state = {k: v.detach() for k, v in drafter.state_dict().items() if k not in ("draft_vocab", last)}
    weight = drafter.lm_head[-1].weight.detach()
    wide = torch.promote_types(weight.dtype, torch.float32)
    if c.tied_head:
        if output_embedding is None:
            raise DrafterError("a tied-head drafter needs the target's output embedding to be exported")
        if tuple(output_embedding.shape) != (c.vocab_size, c.hidden_size):
            raise DrafterError(
                f"the target's output embedding is {list(output_embedding.shape)}, the drafter needs "
                f"[{c.vocab_size}, {c.hidden_size}]"
            )
        head = output_embedding.detach().to(device=weight.device, dtype=wide) @ weight.to(wide)  # [V, exit_dim]
    else:
        head = weight.new_zeros(c.vocab_size, c.exit_dim, dtype=wide)
        head[drafter.draft_vocab] = weight.to(wide)
    state[last] = head
    added = c.vocab_size - c.draft_vocab_size
    return state, added, added > 0 and not c.tied_head


def reference_config(drafter: RecurrentDrafter, dtype: torch.dtype) -> dict:
    """``config.json`` with the fields of Apple's ``DrafterConfig``, plus ``rnn_cell`` (ours; both
    engines ignore it, and :meth:`RecurrentDrafter.from_pretrained` reads it back)."""
    c = drafter.config
    return {
        "model_type": MODEL_TYPE,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "exit_dim": c.exit_dim,
        "num_draft_layers": c.num_draft_layers,
        "num_lookback_tokens": -1,  # Apple's field, unused by its code
        "rnn": c.rnn,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rnn_cell": c.rnn_cell,
    }


def engine_commands(fmt: str, base_model: str, dtype: torch.dtype, num_beams: int, draft_len: int) -> str:
    """A shell script that runs the exported folder (``$0``'s folder) in ``fmt``'s engine.

    ``draft_len`` is ours (root token included): TensorRT-LLM's ``draft_len_per_beam`` is
    ``draft_len - 1``; Apple's ``beam_length`` is ``draft_len``.
    """
    trt_dtype, apple_dtype = DTYPE_FLAGS[str(dtype).removeprefix("torch.")]
    lines = [
        "#!/bin/sh",
        "# Written by `redrafter export`: run this drafter in " + ENGINE_NAME[fmt] + ".",
        "set -e",
        'HERE=$(cd "$(dirname "$0")" && pwd)',
        f"BASE_MODEL=${{BASE_MODEL:-{base_model}}}  # the target's Hugging Face folder",
    ]
    if fmt == "trtllm":
        lines += [
            "TRTLLM=${TRTLLM:-TensorRT-LLM}  # a checkout of NVIDIA/TensorRT-LLM matching the installed tensorrt_llm",
            'python "$TRTLLM/examples/redrafter/convert_checkpoint.py" --model_dir "$BASE_MODEL" \\',
            '    --drafter_model_dir "$HERE" --output_dir "$HERE/tllm_checkpoint" \\',
            f"    --dtype {trt_dtype} --redrafter_num_beams {num_beams} --redrafter_draft_len_per_beam {draft_len - 1}",
            'trtllm-build --checkpoint_dir "$HERE/tllm_checkpoint" --output_dir "$HERE/engine" \\',
            f"    --gemm_plugin {trt_dtype} --speculative_decoding_mode explicit_draft_tokens --max_batch_size 8",
            'python "$TRTLLM/examples/run.py" --engine_dir "$HERE/engine" --tokenizer_dir "$BASE_MODEL" \\',
            '    --max_output_len 256 --input_text "${PROMPT:-Tell me about the history of Paris.}"',
        ]
    else:
        lines += [
            "# pip install the ml-recurrent-drafter checkout first; --use_gpu=-1 runs on the CPU",
            'python -m recurrent_drafting.cmd.generate --hf_tokenizer="$BASE_MODEL" --hf_llm="$BASE_MODEL" \\',
            f'    --hf_drafter="$HERE" --beam_width={num_beams} --beam_length={draft_len} --greedy_search=True \\',
            f"    --dtype={apple_dtype} --use_gpu=${{GPU:-0}}",
        ]
    return "\n".join(lines) + "\n"


def export_drafter(
    drafter: RecurrentDrafter,
    out: str | os.PathLike,
    fmt: str,
    *,
    target=None,
    tokenizer=None,
    target_folder: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    num_beams: int = 5,
    draft_len: int = 5,
    force: bool = False,
    allow_cell_mismatch: bool = False,
) -> ExportResult:
    """Write ``drafter`` in the reference layout for ``fmt`` into the folder ``out``.

    Args:
        drafter: the drafter to export.
        out: the folder to write (refused if it exists and is not empty, unless ``force``).
        fmt: ``"apple"`` or ``"trtllm"`` (:data:`FORMATS`).
        target: the target model, for a tied head's output embedding and, with ``tokenizer``,
            for ``base_model/`` (written when ``target_folder`` is None: a GGUF target).
        target_folder: the target's own Hugging Face folder, referenced by the commands as is.
        dtype: the dtype of the written tensors (and of ``base_model/``).
        num_beams, draft_len: the tree the commands build the engine for (``draft_len`` counts
            the root token, as ours does).
        allow_cell_mismatch: export a drafter whose RNN cell is not the engine's.
    Returns:
        :class:`ExportResult`.
    """
    out = Path(out).expanduser()
    check_export(drafter, fmt, out, force, allow_cell_mismatch, target is not None)
    output_embedding = target.get_output_embeddings().weight if target is not None else None
    tensors, added, zero_rows = reference_tensors(drafter, output_embedding)
    tensors = {k: v.to(dtype).contiguous().cpu() for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(reference_config(drafter, dtype), indent=2) + "\n")
        base_model: Path | None = None
        base_ref = "${BASE_MODEL:?set BASE_MODEL to the target's Hugging Face folder}"
        if target_folder is not None:
            base_model = Path(target_folder).resolve()
            base_ref = shlex.quote(str(base_model))
        elif target is not None and tokenizer is not None:
            copy.deepcopy(target).to(dtype).save_pretrained(tmp / "base_model")  # the caller's stays as it is
            tokenizer.save_pretrained(tmp / "base_model")
            _add_legacy_config_keys(tmp / "base_model" / "config.json")
            base_model, base_ref = out / "base_model", '"$HERE/base_model"'
        script = tmp / f"{fmt}.sh"
        script.write_text(engine_commands(fmt, base_ref, dtype, num_beams, draft_len))
        script.chmod(0o755)
        for path in [tmp, *tmp.rglob("*")]:
            plain_permissions(path)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shapes = {k: list(v.shape) for k, v in tensors.items()}
    return ExportResult(out, shapes, added, zero_rows, base_model)


def _add_legacy_config_keys(path: Path) -> None:
    """Also write the keys transformers 4 reads (``torch_dtype``, ``rope_theta``), which the engines'
    converters pin; transformers 5 writes ``dtype`` and ``rope_parameters`` instead."""
    config = json.loads(path.read_text())
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    path.write_text(json.dumps(config, indent=2) + "\n")


def _replace_folder(new: Path, out: Path) -> None:
    """Rename ``new`` onto ``out``; an existing ``out`` (allowed by the caller) is removed after."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
    os.replace(out, old / "previous")
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
