"""The prepared GPU run (bench/gpu_check.sh and the scripts it calls) checked here, on CPU.

A lent GPU comes rarely and for 15 minutes, so a script that broke since it last ran (a renamed transformers
keyword, a changed signature of ours) would waste the whole loan.  These run each script's code paths on CPU with
a tiny model: the static-cache decode that the GPU replays as a CUDA graph runs eagerly here, and the Triton
launch-shape sweep runs under Triton's interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_check_script_parses() -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_decode_runs_its_static_cache_path_and_reports_unusable_backends() -> None:
    out = _run(["bench/gpu_decode.py", "--shape", "tiny", "--device", "cpu", "--backends", "torch,marlin",
                "--new-tokens", "6", "--repeats", "1"])  # fmt: skip
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines() if "\t" in line}
    assert rows["fp16"][-1] == "static tokens = eager's for 6/6"
    torch_row = rows["W4G128 torch"]
    assert float(torch_row[1]) > 0 and float(torch_row[3]) > 0  # eager and static tok/s
    assert torch_row[6] == "0.00e+00" and torch_row[-1].endswith("static tokens = eager's for 6/6")
    assert 0.2 < float(torch_row[5]) < 0.3  # 4-bit codes + fp16 scales of group 128 against fp16
    assert "device 'cpu' not in ['cuda']" in rows["W4G128 marlin"][-1]


def test_triton_tile_sweep_runs_every_launch_shape() -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.0')")
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "import torch, gpu_kernels\n"
        "gpu_kernels.cuda_us = lambda fn, iters, warmup=0: (fn(), 1.0)[1]  # CUDA events do not exist here\n"
        "rows = gpu_kernels.triton_tile_sweep(256, 64, torch.float32, 1, device='cpu')\n"
        "print('\\n'.join(rows))\n"
    )
    rows = _run(["-c", code], env={"TRITON_INTERPRET": "1"}).splitlines()
    assert len(rows) == 16, rows
    for row in rows:
        shape, launch, _us, _speedup, err = row.split("\t")
        assert shape == "256x64" and launch.startswith("BLOCK_N=")
        assert float(err) < 1e-5, row  # fp32 activations: the reference's weights, summation order only


def test_gpu_kernel_bench_rows_name_each_backend_or_why_it_cannot_run() -> None:
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "import torch, gpu_kernels\n"
        "gpu_kernels.cuda_us = lambda fn, iters, warmup=0: (fn(), 1.0)[1]  # CUDA events do not exist here\n"
        "print('\\n'.join(gpu_kernels.bench_shape(256, 128, torch.float32, 1, device='cpu')))\n"
    )
    rows = {row.split("\t")[1]: row.split("\t") for row in _run(["-c", code]).splitlines()}
    assert set(rows) == {"fp16 F.linear", "marlin", "exllamav2", "triton", "torch"}
    assert float(rows["torch"][2]) == 0.0  # the reference against itself
    assert "device 'cpu' not in ['cuda', 'xpu']" in rows["triton"][-1]
    assert rows["marlin"][-1] and rows["exllamav2"][-1]  # a reason each (no CUDA here, or no gptqmodel)
