"""The ``marlin`` / ``exllamav2`` bridge against GPTQModel 7.6's own code, on CPU (see gptqmodel_kernel_worker.py).

GPTQModel's CUDA layers cannot run here, so the worker checks what they are built from: our descriptors against
their class attributes, our GPTQ tensors against GPTQModel's v1 -> v2 conversion and its pure-torch layer's
dequantization, and our bridge class around that layer against our ``torch`` backend.  It runs in the gptqmodel
venv (``make venv-interop``) with ``src`` on PYTHONPATH; without that venv the test skips.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("gptqmodel_kernel_worker.py")
GPTQ_PY = ROOT / ".venv-interop" / "bin" / "python"


@pytest.mark.skipif(not GPTQ_PY.exists(), reason="gptqmodel venv missing: run `make venv-interop`")
def test_bridge_matches_gptqmodels_own_code(tmp_path) -> None:
    out = tmp_path / "gptqmodel_kernels.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "GPTQMODEL_CPU_WORKERS": "2",
        "TORCHDYNAMO_DISABLE": "1",
    }
    done = subprocess.run(
        [str(GPTQ_PY), str(WORKER), str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert out.exists(), f"worker crashed (rc {done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(out.read_text())
    worst = max(report["max_rel_err"].items(), key=lambda kv: kv[1])
    print(f"bridge around GPTQModel TorchLinear vs torch backend: worst rel err {worst[1]:.3g} ({worst[0]})")
    assert report["ok"] and done.returncode == 0, "\n".join(report["failures"])
    assert len(report["max_rel_err"]) == 24  # bits 4/8 x sym/asym x groups 32/128/-1 x fp16/bf16


@pytest.mark.skipif(not GPTQ_PY.exists(), reason="gptqmodel venv missing: run `make venv-interop`")
def test_loading_gptqmodel_leaves_the_process_environment_as_it_was() -> None:
    """gptqmodel 7.6.0 rewrites os.environ at import (HF_HOME to /tmp, the CUDA allocator, the GPU order, ...);
    importing it through the bridge must undo that.  The plain import, in its own process, shows what is undone."""
    report = (
        "import json, os, sys\n"
        "from signround.kernels.gptqmodel_bridge import import_gptqmodel\n"
        "before = dict(os.environ)  # after transformers' own imports (torchao sets TORCHINDUCTOR_CACHE_DIR)\n"
        "if sys.argv[1] == 'bridge':\n"
        "    import_gptqmodel('gptqmodel.nn_modules.qlinear.marlin')\n"
        "else:\n"
        "    import gptqmodel.nn_modules.qlinear.marlin\n"
        "print(json.dumps(sorted(k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTORCH_", "CUDA_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    changed = {}
    for how in ("bridge", "plain"):
        done = subprocess.run([str(GPTQ_PY), "-c", report, how], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        changed[how] = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"HF_HOME", "CUDA_DEVICE_ORDER"} <= set(changed["plain"]), changed["plain"]
    assert changed["bridge"] == [], changed["bridge"]
