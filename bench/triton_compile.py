"""Our Triton kernel compiled for NVIDIA GPUs on this CPU machine: every launch shape the code uses, with the
registers, spilled bytes and shared memory of each binary.

Why: the tests run the kernel's arithmetic under Triton's interpreter, which never runs the compiler.  A launch
shape that the compiler rejects, or that spills registers to local memory (slow), shows only on a GPU, and a GPU
is lent rarely.  Triton compiles ahead of time for a named target with the ptxas in its wheel, and the wheel's
cuobjdump reads the resources from the binary: no GPU and no CUDA torch needed.

Cases: ``default_tiles`` at each of its row buckets (1, 32, 64, 512 rows) for 4-bit fp16 with group 128, and at
decode and prefill for 2 / 8 bits, bf16, fp32, group 32, per-channel, and a group of 40 (no tile fits in a group:
the per-row scale gather); then ``--sweep``: the 16 decode launch shapes of ``bench/gpu_kernels.py
--triton-tiles``.

    python bench/triton_compile.py [--arch 90,80] [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

IN_FEATURES = 4096
POINTER = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in maximum per block


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    rows: int
    bits: int = 4
    dtype: str = "float16"
    group_size: int = 128
    tiles: object = None  # a signround.kernels.triton.Tiles, or None for default_tiles(rows, group_size)


def default_cases() -> list[Case]:
    cases = [Case(f"default, {m} rows", m) for m in (1, 32, 64, 512)]
    for m in (1, 512):
        cases += [Case(f"default, {m} rows, {b}-bit", m, bits=b) for b in (2, 8)]
        cases += [Case(f"default, {m} rows, {d}", m, dtype=d) for d in ("bfloat16", "float32")]
        cases += [Case(f"default, {m} rows, group {g}", m, group_size=g) for g in (32, IN_FEATURES, 40)]
    return cases


def sweep_cases() -> list[Case]:
    from signround.kernels.triton import Tiles

    return [
        Case("decode sweep", 1, tiles=Tiles(16, n, 128, num_warps=4, num_stages=s, unpack_once=u))
        for n in (16, 32, 64, 128)
        for s in (2, 4)
        for u in (False, True)
    ]


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_case(case: Case, arch: int) -> dict:
    """Compile one launch shape for ``sm_<arch>``; its tiles, registers, spilled bytes and shared memory."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from signround.kernels.triton import default_tiles, load_kernel, one_group_per_tile_slice

    kernel, interpreted = load_kernel()
    if interpreted:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter's kernel cannot be compiled; unset it")
    tiles = case.tiles or default_tiles(case.rows, case.group_size, getattr(torch, case.dtype))
    group = min(case.group_size, IN_FEATURES)
    constants = {
        "BITS": case.bits,
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "BLOCK_K": tiles.block_k,
        "ONE_GROUP_PER_TILE": one_group_per_tile_slice(group, tiles.block_k, IN_FEATURES),
        "HAS_BIAS": False,
        "DOT_PRECISION": "ieee" if case.dtype == "float32" else None,
        "DOT_IN_FP32": False,
        "UNPACK_ONCE": tiles.unpack_once,
    }
    activation = POINTER[case.dtype]
    signature = dict.fromkeys(("M", "N", "K", "group_size", "stride_xm", "stride_ym"), "i32")
    signature.update(x_ptr=activation, w_ptr="*i32", scales_ptr="*fp16", zeros_ptr="*u8", bias_ptr=activation)
    signature.update(y_ptr=activation, **dict.fromkeys(constants, "constexpr"))
    names = list(inspect.signature(kernel.fn).parameters)
    source = ASTSource(
        fn=kernel,
        signature={name: signature[name] for name in names},
        constexprs={(names.index(name),): value for name, value in constants.items()},
    )
    started = time.perf_counter()
    binary = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages},
    )
    seconds = time.perf_counter() - started
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(binary.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return {
        "case": case.label,
        "arch": arch,
        "tiles": f"{tiles.block_m}x{tiles.block_n}x{tiles.block_k} w{tiles.num_warps} s{tiles.num_stages}"
        + (" unpack_once" if tiles.unpack_once else ""),
        "registers": int(resources["REG"]),
        "spilled_bytes": int(resources["STACK"]) + int(resources["LOCAL"]),  # where ptxas spills registers
        "shared_bytes": max(int(resources["SHARED"]), binary.metadata.shared),
        "shared_limit": SHARED_LIMIT.get(arch),
        "compile_s": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities x10: 90 = H100 / H200, 80 = A100")
    parser.add_argument("--sweep", action="store_true", help="also the 16 decode launch shapes (first arch only)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernel cannot be compiled", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.arch.split(",")]
    jobs = [(case, arch) for arch in archs for case in default_cases()]
    jobs += [(case, archs[0]) for case in sweep_cases()] if args.sweep else []
    if not args.json:
        print("case\tarch\ttiles\tregisters\tspilled bytes\tshared bytes\tcompile s")
    failed = 0
    for case, arch in jobs:
        try:
            row = compile_case(case, arch)
        except Exception as exc:  # a launch shape the compiler rejects is a finding, not a crash
            row = {"case": case.label, "arch": arch, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            failed += 1
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{row['case']}\tsm_{arch}\tFAILED: {row['error']}", flush=True)
        else:
            print(
                f"{row['case']}\tsm_{arch}\t{row['tiles']}\t{row['registers']}\t{row['spilled_bytes']}\t"
                f"{row['shared_bytes']}\t{row['compile_s']}",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
