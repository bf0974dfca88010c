"""Our C kernels for x86 CPUs with AVX-512 VNNI, built on first use (see :func:`library`).

- ``w4a8.c``: quantized weights times int8 activations, and a head's greedy argmax certified from
  such a product (:mod:`redrafter.w4a8`);
- ``attention.c``: attention whose result for a query does not depend on the other queries
  (:mod:`redrafter.attention`);
- ``layer.c``: the decoder layers with w4a8 products for decode steps, all in one call
  (:mod:`redrafter.fused_layer`), and the accepted path's cache entries moved in all layers at once
  (:meth:`redrafter.kv_cache.TreeKVCache.keep`);
- ``head.c``: the target's output head with bfloat16 weights, for sampling (:mod:`redrafter.head`);
- ``drafter.c``: the drafter's first draft step, its guess and that guess's probability, in one call
  (:mod:`redrafter.guess`);
- ``kernels.h``: what they share.

They are compiled together with the system's C compiler (``cc``, or ``$CC``; about a second) into
``$REDRAFTER_CACHE`` (default ``~/.cache/redrafter``), named by a hash of the sources and flags, and
run in PyTorch's OpenMP threads (``torch.set_num_threads``). :func:`kernel_refusal` says why they cannot
run where they cannot: off x86-64 Linux, without AVX-512 VNNI, or without a compiler.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "f16c", "fma")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    # x, bf16 (x and y), M, K, codes, scales, bits, N, y
    "w4a8_matmul": [_PTR, ctypes.c_int, _I64, _I64, _PTR, _PTR, ctypes.c_int, _I64, _PTR],
    # the same but y, then the exact weights and their kind, the bounds' gap and norm per output, the ids
    # and how many outputs each row computed exactly
    "w4a8_argmax": [_PTR, ctypes.c_int, _I64, _I64, _PTR, _PTR, ctypes.c_int, _I64, _PTR, ctypes.c_int, *[_PTR] * 4],
    # q, k, v, mask, bf16, B, H, Q, K, D, 11 strides, scale, out
    "invariant_attention": [_PTR, _PTR, _PTR, _PTR, ctypes.c_int, *[_I64] * 16, ctypes.c_float, _PTR],
    # layers, count, bf16, x, B, Q, keys, values (pointer arrays), capacity, length, masks (an array), mask
    # strides (batch, query), cos, sin, captures (an array), final norm, out
    "fused_layers": [_PTR, _I64, ctypes.c_int, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64] + [_PTR] * 5,
    # buffers (an array), count, B, H, capacity, D, bytes per element, start, source [B, n], n
    "kv_keep": [_PTR, *[_I64] * 7, _PTR, _I64],
    # x, bf16 in, M, K, weights, N, bf16 out, y
    "bf16_head": [_PTR, ctypes.c_int, _I64, _I64, _PTR, _I64, ctypes.c_int, _PTR],
    # drafter, hidden, its row stride, embedding table, ids, bf16, B, draft vocabulary, tokens, probabilities
    "drafter_guess": [_PTR, _PTR, _I64, _PTR, _PTR, ctypes.c_int, _I64, _PTR, _PTR, _PTR],
}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cache_dir() -> Path:
    """Where the compiled kernels are kept: ``$REDRAFTER_CACHE``, else ``$XDG_CACHE_HOME/redrafter``."""
    if os.environ.get("REDRAFTER_CACHE"):
        return Path(os.environ["REDRAFTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "redrafter"


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    """The loaded library, or None and why it cannot run here (built at most once a process)."""
    if platform.machine() not in ("x86_64", "AMD64") or platform.system() != "Linux":
        return None, f"our C kernels run on x86-64 Linux CPUs, not {platform.system()} {platform.machine()}"
    missing = [flag for flag in CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        return None, f"our C kernels need AVX-512 VNNI; this CPU lacks {', '.join(missing)}"
    asked = os.environ.get("CC")
    compiler = shutil.which(asked) if asked else shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "our C kernels compile on first use, and no C compiler (cc, gcc or $CC) was found"
    sources = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    path = cache_dir() / f"kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built)]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                return None, f"our C kernels did not compile with {compiler}: {run.stderr.strip()[-500:]}"
            os.replace(built, path)  # whole or not at all, also with another process building it
    lib = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = ctypes.c_int, argtypes
    return lib, None


def kernel_refusal() -> str | None:
    """Why our C kernels cannot run on this machine, or None when they can (building them if needed)."""
    return _build()[1]


def library() -> ctypes.CDLL:
    """The loaded kernels (a :class:`RuntimeError` with :func:`kernel_refusal`'s reason where they cannot run)."""
    lib, refusal = _build()
    if lib is None:
        raise RuntimeError(refusal)
    return lib
