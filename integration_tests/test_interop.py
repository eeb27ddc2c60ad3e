"""Cross-tool checks: our checkpoints in GPTQModel / transformers' GPTQ path / Intel's auto-round, and theirs in ours.

Our side uses the exact ``torch`` backend (the CPU default for 4-bit, ``torch_int4``, computes in bf16).  The
other tools live in their own venvs (``make venv-interop``: gptqmodel 7.6.0 + optimum; ``make venv-ref``:
auto-round 0.16.1; ``make test`` builds both), and run ``interop_worker.py`` in a subprocess; logits come back
through a safetensors file.  Without those venvs the tests skip, naming the make target.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import signround
from signround import AutoRoundConfig
from signround.layers import quant_linears

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("interop_worker.py")
GPTQ_PY = ROOT / ".venv-interop" / "bin" / "python"
REF_PY = ROOT / ".venv-ref" / "bin" / "python"

needs_gptqmodel = pytest.mark.skipif(not GPTQ_PY.exists(), reason="gptqmodel venv missing: run `make venv-interop`")
needs_autoround = pytest.mark.skipif(not REF_PY.exists(), reason="auto-round venv missing: run `make venv-ref`")


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))  # = interop_worker.token_ids


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits.float()


def _worker(python: Path, *args: str, timeout: int = 600) -> None:
    done = subprocess.run([str(python), str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{python.parent.parent.name} worker {args[0]} failed:\n{done.stderr[-4000:]}"


def _their_logits(python: Path, command: str, ckpt: Path, tmp_path: Path, *extra: str) -> torch.Tensor:
    out = tmp_path / f"{command}-{ckpt.name}.safetensors"
    _worker(python, command, str(ckpt), str(out), *extra)
    return load_file(str(out))["logits"]


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float) -> None:
    """Max abs difference within ``rel`` of the logits' range (fp16/bf16 kernels round differently)."""
    scale = float(ours.abs().max())
    err = float((ours - theirs).abs().max())
    print(f"interop: max |ours - theirs| = {err:.3g} (logits max {scale:.3g})")
    assert err <= rel * scale, f"max |ours - theirs| = {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module")
def our_gptq(tmp_path_factory, tiny_llama_dir) -> tuple[Path, torch.Tensor]:
    out = tmp_path_factory.mktemp("interop") / "ours_gptq"
    ar = signround.AutoRound(
        str(tiny_llama_dir), group_size=32, iters=0, disable_opt_rtn=True, backend="torch", show_progress=False
    )
    ar.quantize_and_save(out, format="auto_gptq")
    return out, _logits(ar.model)


@needs_gptqmodel
def test_our_auto_gptq_in_transformers_gptq_path(our_gptq, tmp_path) -> None:
    ckpt, ours = our_gptq
    _close(ours, _their_logits(GPTQ_PY, "gptq-logits", ckpt, tmp_path, "--loader", "transformers"), rel=1e-3)


@needs_gptqmodel
def test_our_auto_gptq_in_gptqmodel(our_gptq, tmp_path) -> None:
    ckpt, ours = our_gptq
    # GPTQModel's CPU torch kernel runs in bf16: tolerance of bf16 matmuls through 2 blocks
    _close(ours, _their_logits(GPTQ_PY, "gptq-logits", ckpt, tmp_path, "--loader", "gptqmodel"), rel=3e-2)


@needs_gptqmodel
def test_gptqmodel_checkpoint_loads_through_our_config(tmp_path, tiny_llama_dir) -> None:
    ckpt = tmp_path / "gptqmodel_made"
    _worker(GPTQ_PY, "gptq-make", str(tiny_llama_dir), str(ckpt))
    theirs = _their_logits(GPTQ_PY, "gptq-logits", ckpt, tmp_path, "--loader", "transformers")
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, quantization_config=AutoRoundConfig(backend="torch"), dtype=torch.float32
    )
    assert len(quant_linears(model)) == 14
    _close(_logits(model), theirs, rel=1e-3)


@needs_autoround
def test_intel_autoround_checkpoint_loads_in_ours(tmp_path, tiny_llama_dir) -> None:
    ckpt = tmp_path / "intel_made"
    _worker(REF_PY, "autoround-make", str(tiny_llama_dir), str(ckpt))
    theirs = _their_logits(REF_PY, "autoround-logits", ckpt, tmp_path)
    # quant_method auto-round loads through signround; the torch backend is the exact reference
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=AutoRoundConfig(backend="torch")
    )
    assert len(quant_linears(model)) == 14
    _close(_logits(model), theirs, rel=1e-3)


@needs_autoround
def test_our_auto_round_checkpoint_loads_in_intel_autoround(tmp_path, tiny_llama_dir) -> None:
    ckpt = tmp_path / "ours_auto_round"
    ar = signround.AutoRound(
        str(tiny_llama_dir), group_size=32, iters=0, disable_opt_rtn=True, backend="torch", show_progress=False
    )
    ar.quantize_and_save(ckpt, format="auto_round")
    _close(_logits(ar.model), _their_logits(REF_PY, "autoround-logits", ckpt, tmp_path), rel=1e-3)
