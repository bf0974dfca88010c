"""The sampling head (kernels/head.c) as of commit 2c574a3, one output's horizontal sum at a time, against
this tree's, sixteen outputs' sums in one transposed reduction: the same bits on random cases, and
milliseconds per call for the default model's 49,152 x 576 head (2 threads, best of 5 x 30).

    python docs/prefetch/head_sums.py

Both files are compiled here with gcc against this tree's kernels.h and called through ctypes. Cases: 1
to 9 rows, 16 to 640 inputs, 16 to 4,099 outputs (some not a multiple of 16), bfloat16 and float32 in
and out, a NaN input now and then.
"""

import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "src/redrafter/kernels"
PTR, I64 = ctypes.c_void_p, ctypes.c_int64


def build(commit: str | None, folder: Path) -> ctypes.CDLL:
    source = folder / "head.c"
    if commit:
        text = subprocess.run(["git", "show", f"{commit}:src/redrafter/kernels/head.c"], cwd=ROOT, capture_output=True)
        source.write_bytes(text.stdout)
    else:
        source.write_bytes((KERNELS / "head.c").read_bytes())
    (folder / "kernels.h").write_bytes((KERNELS / "kernels.h").read_bytes())
    library = folder / "head.so"
    subprocess.run(["gcc", "-O3", "-fPIC", "-shared", "-fopenmp", source, "-o", library, "-lm"], check=True)
    lib = ctypes.CDLL(str(library))
    lib.bf16_head.argtypes = [PTR, ctypes.c_int, I64, I64, PTR, I64, ctypes.c_int, PTR]
    return lib


def run(lib, x: torch.Tensor, weight: torch.Tensor, bf16_out: int) -> torch.Tensor:
    (rows, inputs), outputs = x.shape, weight.shape[0]
    y = torch.empty(rows, outputs, dtype=torch.bfloat16 if bf16_out else torch.float32)
    bf16_in = x.dtype == torch.bfloat16
    lib.bf16_head(x.data_ptr(), bf16_in, rows, inputs, weight.data_ptr(), outputs, bf16_out, y.data_ptr())
    return y


with tempfile.TemporaryDirectory() as scratch:
    (Path(scratch) / "old").mkdir(), (Path(scratch) / "new").mkdir()
    libs = {"2c574a3": build("2c574a3", Path(scratch) / "old"), "this tree": build(None, Path(scratch) / "new")}
    generator = torch.Generator().manual_seed(0)
    differing = 0
    for case in range(200):
        rows, inputs, outputs = 1 + case % 9, 16 * (1 + case % 40), [16, 304, 49, 1000, 4099][case % 5]
        weight = torch.randn(outputs, inputs, generator=generator).bfloat16()
        x = torch.randn(rows, inputs, generator=generator) * (1 + case % 7)
        x = x.to(torch.bfloat16 if case % 2 else torch.float32)
        if case % 37 == 5:
            x[0, 0] = float("nan")
        for bf16_out in (0, 1):
            a, b = (run(lib, x, weight, bf16_out) for lib in libs.values())
            bits = torch.int16 if bf16_out else torch.int32
            differing += not torch.equal(a.view(bits), b.view(bits))
    print(f"400 random cases: {differing} with different bits")
    weight = torch.randn(49152, 576).bfloat16()
    print("milliseconds per call, the default model's head shape, bfloat16 in and out:")
    for rows in (1, 5, 8):
        x = torch.randn(rows, 576).bfloat16()
        for name, lib in libs.items():
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(30):
                    run(lib, x, weight, 1)
                best = min(best, (time.perf_counter() - start) / 30 * 1e3)
            print(f"  {rows} rows, {name:>9}: {best:5.2f}")
