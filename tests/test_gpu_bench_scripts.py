"""The prepared GPU run (bench/gpu_check.sh and the scripts it calls) checked here, on CPU.

A lent GPU comes rarely and for 15 minutes, so a script that broke since it last ran (a renamed transformers
keyword, a changed signature of ours) would waste the whole loan.  These run each script's code paths on CPU with
a tiny model: the static-cache decode that the GPU replays as a CUDA graph runs eagerly here, and the Triton
launch-shape sweep runs under Triton's interpreter.
"""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh", "gpu_prebuild.sh", "gpu_tune.sh"])
def test_gpu_shell_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_decode_runs_its_static_cache_path_and_reports_unusable_backends() -> None:
    def decode_rows(*extra: str) -> dict[str, list[str]]:
        out = _run(["bench/gpu_decode.py", "--shape", "tiny", "--device", "cpu", "--backends", "torch,marlin",
                    "--new-tokens", "6", "--repeats", "1", *extra])  # fmt: skip
        return {line.split("\t")[0]: line.split("\t") for line in out.splitlines() if "\t" in line}

    untimed = decode_rows()["W4G128 torch"]  # by default the reference gives its logits and bytes, not a speed
    assert untimed[1:5] == ["-"] * 4 and untimed[-1].endswith("not timed (--untimed)")
    assert 0.2 < float(untimed[5]) < 0.3
    rows = decode_rows("--untimed", "")
    assert rows["fp16"][-1] == "static tokens = eager's for 6/6"
    torch_row = rows["W4G128 torch"]
    assert float(torch_row[1]) > 0 and float(torch_row[3]) > 0  # eager and static tok/s
    assert torch_row[6] == "0.00e+00" and torch_row[-1].endswith("static tokens = eager's for 6/6")
    assert 0.2 < float(torch_row[5]) < 0.3  # 4-bit codes + fp16 scales of group 128 against fp16
    assert "device 'cpu' not in ['cuda']" in rows["W4G128 marlin"][-1]


def test_gpu_decode_triton_variant_loads_each_word_once_only_at_decode() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_decode
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from signround.kernels import triton as triton_backend

    with gpu_decode.triton_decode_option("unpack_once"):
        assert triton_backend.default_tiles(1, 128).unpack_once
        assert not triton_backend.default_tiles(512, 128).unpack_once
    assert not triton_backend.default_tiles(1, 128).unpack_once  # put back
    with pytest.raises(SystemExit):
        gpu_decode.main(["--device", "cpu", "--shape", "tiny", "--backends", "marlin+unpack_once"])


def test_triton_tile_sweep_runs_every_launch_shape() -> None:
    pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.0')")
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "import torch, gpu_kernels\n"
        "gpu_kernels.cuda_us = lambda fns, iters, graph=False: ([f() for f in fns], 1.0)[1]  # no CUDA events here\n"
        "rows = gpu_kernels.triton_tile_sweep(256, 64, torch.float32, 1, device='cpu')\n"
        "print('\\n'.join(rows))\n"
    )
    rows = _run(["-c", code], env={"TRITON_INTERPRET": "1"}).splitlines()
    assert len(rows) == 16, rows
    for row in rows:
        shape, launch, _us, _speedup, err = row.split("\t")
        assert shape == "256x64" and launch.startswith("BLOCK_N="), row  # an error row names its exception
        assert float(err) < 1e-5, row  # fp32 activations: the reference's weights, summation order only


def test_gpu_kernel_bench_rows_name_each_backend_or_why_it_cannot_run() -> None:
    code = (
        "import sys; sys.path.insert(0, 'bench')\n"
        "import torch, gpu_kernels\n"
        "gpu_kernels.cuda_us = lambda fns, iters, graph=False: ([f() for f in fns], 1.0)[1]  # no CUDA events here\n"
        "gpu_kernels.replay_matches_eager = lambda layer, x: bool(layer(x).numel())  # nor CUDA graphs\n"
        "print('\\n'.join(gpu_kernels.bench_shape(256, 128, torch.float32, 1, device='cpu')))\n"
        "gpu_kernels.replay_matches_eager = lambda layer, x: False  # a kernel the graph does not record\n"
        "print('\\n'.join('uncaptured ' + r for r in gpu_kernels.bench_shape(256, 128, torch.float32, 1, device='cpu')))\n"
    )
    out = _run(["-c", code]).splitlines()
    uncaptured = {row.split("\t")[1]: row.split("\t") for row in out if row.startswith("uncaptured ")}
    rows = {row.split("\t")[1]: row.split("\t") for row in out if not row.startswith("uncaptured ")}
    assert set(rows) == {"fp16 F.linear", "marlin", "exllamav2", "triton", "torch"}
    assert float(rows["torch"][2]) == 0.0  # the reference against itself
    assert rows["torch"][5] == "1.0" and rows["torch"][-1].endswith("1 copies")  # graph-replay column; no L2 here
    assert uncaptured["torch"][5] == "-" and uncaptured["torch"][3] == "1.0"  # eager figures kept
    assert uncaptured["torch"][-1].endswith("graph: its replay does not give the eager output (not captured)")
    assert "device 'cpu' not in ['cuda', 'xpu']" in rows["triton"][-1]
    assert rows["marlin"][-1] and rows["exllamav2"][-1]  # a reason each (no CUDA here, or no gptqmodel)


def _gpu_prebuilt():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_prebuilt
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_prebuilt


def test_prebuilt_kernels_are_refused_for_another_torch_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    gpu_prebuilt = _gpu_prebuilt()
    here = {"torch": torch.__version__, "gptqmodel": "7.6.0", "arch": "9.0"}
    assert "this is torch" in gpu_prebuilt.mismatch({**here, "torch": "0.0.0+cu999"})
    monkeypatch.setattr(gpu_prebuilt, "_installed_version", lambda package: "7.6.0")
    assert "this is gptqmodel 7.6.0" in gpu_prebuilt.mismatch({**here, "gptqmodel": "7.5.1"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_prebuilt.mismatch(here) == "no CUDA device here"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0))
    assert "this GPU is 8.0" in gpu_prebuilt.mismatch(here)
    assert gpu_prebuilt.mismatch({**here, "arch": "8.0;9.0+PTX"}) is None


def test_prebuilt_kernels_install_where_the_loader_looks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``install`` copies each checked library into the folder GPTQModel's loader computes on that machine."""
    import hashlib
    import json

    gpu_prebuilt = _gpu_prebuilt()
    carried = tmp_path / "prebuilt"
    carried.mkdir()
    libraries = {}
    for name, payload in (("marlin_fp16", b"built"), ("exllamav2", b"tampered")):
        (carried / f"{name}.so").write_bytes(payload)
        libraries[name] = {"file": f"{name}.so", "binary": f"gptqmodel_{name}_ops.so",
                           "sha256": hashlib.sha256(b"built").hexdigest()}  # fmt: skip
    (carried / gpu_prebuilt.MANIFEST).write_text(json.dumps({"libraries": libraries}))

    class LoaderFolder:  # stands in for GPTQModel's TorchOpsJitExtension, whose cache folder is a hash
        def __init__(self, name: str) -> None:
            self.name = name

        def build_root(self) -> Path:
            return tmp_path / "cache" / self.name / "0123abcd"

    monkeypatch.setattr(gpu_prebuilt, "_extension", LoaderFolder)
    monkeypatch.setattr(gpu_prebuilt, "mismatch", lambda manifest: None)
    assert gpu_prebuilt.install(carried) == 0
    assert (tmp_path / "cache/marlin_fp16/0123abcd/gptqmodel_marlin_fp16_ops.so").read_bytes() == b"built"
    assert not (tmp_path / "cache/exllamav2").exists()  # its checksum did not match

    monkeypatch.setattr(gpu_prebuilt, "mismatch", lambda manifest: "built for torch 9.9")
    assert gpu_prebuilt.install(carried) == 1


def test_kernel_bench_calls_enough_copies_to_read_dram_not_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_kernels
    finally:
        sys.path.remove(str(ROOT / "bench"))
    h100 = types.SimpleNamespace(L2_cache_size=50 * 2**20)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda device: h100)
    assert gpu_kernels.copies_beyond_l2(8 * 2**20, "cuda") == 13  # a 4096x4096 4-bit layer: 104 MiB > 2 x L2
    assert gpu_kernels.copies_beyond_l2(90 * 2**20, "cuda") == 2  # its 11008x4096 fp16 weight
    assert gpu_kernels.copies_beyond_l2(8 * 2**20, "cpu") == 1


def test_gpu_tune_pair_times_both_tools_on_the_same_random_model(tmp_path: Path) -> None:
    """bench/gpu_tune.sh's steps on CPU with stories260K's shapes: prepare, build, one timed run per tool."""
    stories = ROOT.parent / "shared" / "models" / "stories260K"
    env = {"GPU_TUNE_CARRY": str(tmp_path / "carry")}
    _run(["bench/gpu_tune_pair.py", "prepare", "--model-src", str(stories)], env)
    assert (tmp_path / "carry" / "tinyshakespeare.txt").exists() and (tmp_path / "carry" / "config.json").exists()
    model = tmp_path / "model"
    _run(["bench/gpu_tune_pair.py", "build", "--layers", "2", "--model-dir", str(model)], env)
    rows = tmp_path / "rows.jsonl"
    run = ["bench/gpu_tune_pair.py", "run", "--iters", "2", "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
           "--model-dir", str(model), "--out", str(rows)]  # fmt: skip
    _run([*run, "--tool", "ours"], env)
    ours = json.loads(rows.read_text().splitlines()[-1])
    assert ours["tool"].startswith("signround") and ours["blocks"] == 2 and ours["blocks_tuned"] == 2
    assert ours["tune_seconds"] > 0 and ours["iters"] == 2 and ours["seqlen"] == 32
    ref_python = ROOT / ".venv-ref" / "bin" / "python"
    if not ref_python.exists():
        pytest.skip("the reference venv is missing (make venv-ref): the auto-round half of the pair is not checked")
    done = subprocess.run(
        [str(ref_python), *run, "--tool", "reference"], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ref = json.loads(rows.read_text().splitlines()[-1])
    assert ref["tool"].startswith("auto-round") and ref["blocks"] == 2 and ref["tune_seconds"] > 0


def test_profile_counts_the_ops_of_one_iteration_without_the_walk_around_it() -> None:
    """bench/profile_tune.py --ops-per-iteration: the GPU launch proxy measured on CPU (two walks differenced)."""
    stories = ROOT.parent / "shared" / "models" / "stories260K"
    base = ["bench/profile_tune.py", "--model", str(stories), "--blocks", "1", "--ops-per-iteration", "--threads", "1",
            "--nsamples", "4", "--seqlen", "32"]  # fmt: skip
    totals = []
    for iters in ("2", "4"):
        out = _run([*base, "--iters", iters])
        line = next(row for row in out.splitlines() if row.startswith("aten ops per iteration"))
        totals.append(float(line.split(":")[1].split(",")[0]))
        assert "aten::mm" in out  # the layers' matmuls are among one iteration's ops
    # per iteration, about independent of the run length (iterations that improve the best also pack its codes)
    assert totals[0] > 50 and abs(totals[0] - totals[1]) < 0.1 * totals[0]
