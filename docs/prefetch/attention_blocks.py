"""Our attention (kernels/attention.c) as of commit a8aea92, a horizontal sum per key, against this tree's,
sixteen keys' sums at a time: the same bits on random cases, and microseconds per call (one thread).

    python docs/prefetch/attention_blocks.py

Both files are compiled here with gcc into a temporary folder and called through ctypes
(attention_group: the query heads of one key/value head over one mask row, as a decode step runs them).
Cases: 1 to 9 query heads, head sizes 16 to 256, 1 to 300 keys, float32 and bfloat16, masks keeping keys
at random, all, from a point on, or all but some of the last seven; a NaN query now and then.
"""

import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = "src/redrafter/kernels"
PTR, I64 = ctypes.c_void_p, ctypes.c_int64


def build(commit: str | None, folder: Path) -> ctypes.CDLL:
    for name in ("attention.c", "kernels.h"):
        if commit:
            text = subprocess.run(
                ["git", "show", f"{commit}:{KERNELS}/{name}"], cwd=ROOT, capture_output=True, check=True
            )
            (folder / name).write_bytes(text.stdout)
        else:
            (folder / name).write_bytes((ROOT / KERNELS / name).read_bytes())
    library = folder / "attention.so"
    subprocess.run(
        ["gcc", "-O3", "-fPIC", "-shared", "-fopenmp", folder / "attention.c", "-o", library, "-lm"], check=True
    )
    lib = ctypes.CDLL(str(library))
    lib.attention_group.argtypes = [
        PTR,
        I64,
        I64,
        PTR,
        PTR,
        PTR,
        ctypes.c_int,
        I64,
        I64,
        I64,
        I64,
        ctypes.c_float,
        PTR,
        PTR,
        PTR,
    ]
    return lib


def run(lib, q, k, v, mask, heads, keys, dim, bf16) -> torch.Tensor:
    scores, kept, out = torch.empty(8 * keys + 16), torch.empty(keys + 16, dtype=torch.int32), torch.empty(heads * dim)
    lib.attention_group(
        q.data_ptr(), dim, heads, k.data_ptr(), v.data_ptr(), mask.data_ptr(), bf16, keys, dim, dim, dim, 0.125,
        scores.data_ptr(), kept.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out


with tempfile.TemporaryDirectory() as scratch:
    (Path(scratch) / "old").mkdir(), (Path(scratch) / "new").mkdir()
    libs = {"a8aea92": build("a8aea92", Path(scratch) / "old"), "this tree": build(None, Path(scratch) / "new")}
    generator = torch.Generator().manual_seed(0)
    differing = 0
    for case in range(600):
        heads, dim = [1, 3, 4, 2, 5, 8, 9][case % 7], [64, 128, 32, 16, 256][case % 5]
        keys, bf16 = int(torch.randint(1, 300, (1,), generator=generator)), case % 2
        dtype = torch.bfloat16 if bf16 else torch.float32
        spread = float(torch.rand(1, generator=generator) * 8)
        q = (torch.randn(heads, dim, generator=generator) * spread).to(dtype)
        k, v = (torch.randn(keys, dim, generator=generator).to(dtype) for _ in range(2))
        kind = case % 4
        if kind == 0:
            keep = torch.rand(keys, generator=generator) > 0.3
        elif kind == 1:
            keep = torch.ones(keys, dtype=torch.bool)
        elif kind == 2:
            keep = torch.arange(keys) >= int(torch.randint(0, keys, (1,), generator=generator))
        else:
            keep = torch.ones(keys, dtype=torch.bool)
            keep[-7:] = torch.rand(min(7, keys), generator=generator) > 0.5
        mask = torch.where(keep, torch.randn(keys, generator=generator) * (case % 3), torch.tensor(-3e38)).to(dtype)
        if case % 50 == 7:
            q[0, 0] = float("nan")
        a, b = (run(lib, q, k, v, mask, heads, keys, dim, bf16) for lib in libs.values())
        differing += not torch.equal(a.view(torch.int32), b.view(torch.int32))
    print(f"600 random cases: {differing} with different bits")
    print("microseconds per call, 3 query heads of 64, bfloat16, every key kept (best of 5 x 300):")
    for keys in (16, 1000, 4096):
        q, k, v = torch.randn(3, 64).bfloat16(), torch.randn(keys, 64).bfloat16(), torch.randn(keys, 64).bfloat16()
        mask = torch.zeros(keys).bfloat16()
        for name, lib in libs.items():
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(300):
                    run(lib, q, k, v, mask, 3, keys, 64, 1)
                best = min(best, (time.perf_counter() - start) / 300 * 1e6)
            print(f"  {keys:5d} keys, {name:>9}: {best:6.1f}")
