"""Which conditions let Inductor offer its AMX int4 template for one int4 product (16 x 576 by
576 x 3072)? Run with the caches off, or a cached compile prints nothing:

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python docs/compile/woq-int4/probe.py CASE | grep -c "AUTOTUNE _weight"

CASE: ``base`` (no_grad), ``infrun`` (compiled and run under inference_mode), ``infweights``
(weights made under inference_mode too), ``fusedview`` (the codes a view of a larger buffer, as
fused layers hold them), ``reshape`` (the input reshaped first, as ``Int4Linear`` does),
``dynamic`` (``dynamic=True``).
"""

import sys

import torch
import torch._inductor.config as inductor_config
from woq_bench import Int4Product  # this script's folder is on the path when run as a script

case = sys.argv[1]
torch.set_num_threads(2)
with torch.inference_mode() if case == "infweights" else torch.no_grad():
    module = Int4Product(576, 3072, reshape=case == "reshape").eval()
if case == "fusedview":
    module.packed = torch.cat([module.packed, Int4Product(576, 1536).packed])[: module.packed.shape[0]]
inductor_config.freezing = True
inductor_config.max_autotune = True
inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
with torch.inference_mode() if case in ("infrun", "infweights") else torch.no_grad():
    x = torch.randn(16, 576, dtype=torch.bfloat16)
    torch.compile(module, dynamic=case == "dynamic")(x[None] if case == "reshape" else x)
