"""Our Triton kernel through the real compiler for NVIDIA GPUs (sm_90: H100 / H200; sm_80: A100), on CPU.

tests/test_kernels_triton.py runs the kernel's arithmetic under Triton's interpreter, which never compiles it; a
launch shape that the compiler rejects, spills registers by the kilobyte, or asks for more shared memory than a
block may have would show only on a GPU.  bench/triton_compile.py compiles every launch shape the code uses ahead of time, with
the ptxas and cuobjdump in Triton's wheel, in its own process (``TRITON_INTERPRET`` unset).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.0')")
ROOT = Path(__file__).resolve().parent.parent
SMALL_SPILL_BYTES = 64
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not CUOBJDUMP.exists():
        pytest.skip(f"this triton wheel has no NVIDIA toolchain ({CUOBJDUMP} missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "bench/triton_compile.py", "--sweep", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows, done.stderr[-3000:]
    return rows


def test_every_default_launch_shape_compiles_for_a100_and_h100_without_costly_spills(compiled: list[dict]) -> None:
    defaults = [row for row in compiled if row["case"].startswith("default")]
    assert {row["arch"] for row in defaults} == {80, 90} and len(defaults) == 2 * 18
    for row in defaults:
        assert "error" not in row, row
        # a few bytes of stack are a register or two (Triton 3.9 spills 8 bytes in two of these on sm_90, 3.8
        # and 3.6 none); the spills that slow a kernel are kilobytes, as fp32's 2.7-5.6 KB were before its tiles
        assert row["spilled_bytes"] <= SMALL_SPILL_BYTES, row
        assert row["shared_bytes"] <= row["shared_limit"], row  # a launch would fail: out of shared memory
        assert 0 < row["registers"] <= 255, row


def test_every_decode_sweep_shape_compiles(compiled: list[dict]) -> None:
    """The 16 launch shapes that bench/gpu_kernels.py --triton-tiles times on a lent GPU all reach a binary.  Some
    are candidates only: at 4 stages two of them spill, and one asks for more shared memory than an H100 block
    may have (docs/backends.md); the sweep's rows are read against these figures."""
    sweep = [row for row in compiled if row["case"] == "decode sweep"]
    assert len(sweep) == 16 and len({row["tiles"] for row in sweep}) == 16
    for row in sweep:
        assert "error" not in row and row["registers"] > 0, row
