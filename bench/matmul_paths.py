"""Whether this CPU path changes the bits of a matmul: a fingerprint of one bf16 and one fp32 product.

    .venv/bin/python bench/matmul_paths.py
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 .venv/bin/python bench/matmul_paths.py     # oneDNN without AMX
    MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python bench/matmul_paths.py            # MKL's AVX2 kernels

torch runs bf16 matmuls on CPU through oneDNN (AMX, AVX-512-BF16, ... chosen per CPU; ``ONEDNN_MAX_CPU_ISA``
caps it) and fp32 ones through MKL (``MKL_ENABLE_INSTRUCTIONS``); different kernels sum in different orders, so
the same inputs give products that differ in their last bits.  Tuning amplifies such differences (50 signed
steps whose signs flip on ties), which is why a tuned row can move between CPUs; the shapes are one SmolLM2 MLP
matmul (512 tokens x 576 -> 1536).  Prints one line per dtype: the md5 of the product's bytes and its largest
difference from the float64 product of the same (rounded) inputs.
"""

from __future__ import annotations

import hashlib
import os

import torch


def main() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    caps = {
        k: os.environ[k]
        for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
        if k in os.environ
    }
    print(f"caps: {caps or 'none'}")
    for dtype in (torch.bfloat16, torch.float32):
        x, y = a.to(dtype), b.to(dtype)
        c, exact = (x @ y).float(), x.double() @ y.double()  # exact: of the inputs as this dtype holds them
        digest = hashlib.md5(c.numpy().tobytes()).hexdigest()
        print(f"{dtype!s:15s} md5 {digest}  max |c - exact| {(c.double() - exact).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
