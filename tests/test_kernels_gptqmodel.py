"""The ``marlin`` / ``exllamav2`` backends (GPTQModel's CUDA kernels): conversion, wrapper, selection, CUDA runs.

Without CUDA (and without gptqmodel, as in the main venv) three things are still proven here: the GPTQ tensors we
hand GPTQModel equal our own GPTQ packers' output, the wrapper keeps its kernel out of the checkpoint and delegates
to it, and ``select()`` picks these backends only for layers GPTQModel can run.  The conversion against GPTQModel's
own code runs in ``integration_tests/test_gptqmodel_kernels.py`` (gptqmodel venv, its CPU kernel).  The tests that
run the kernels themselves skip with "needs CUDA".
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from kernel_pairs import graph_replay_and_eager
from torch import nn

import signround.kernels.exllamav2 as exllamav2_module
from signround.kernels import candidates, get_backend, registry, select
from signround.kernels.exllamav2 import ExllamaV2QuantLinear
from signround.kernels.gptqmodel_bridge import GPTQMODEL_REQUIREMENT, GptqModelQuantLinear, gptqmodel_tensors
from signround.kernels.marlin import MarlinQuantLinear, tile_aligned
from signround.kernels.torch import TorchQuantLinear
from signround.packing import get_packer
from signround.packing.bits import unpack_int32
from signround.quant.int import QuantizedTensor, quantize
from signround.schemes import LayerSpec

W4 = LayerSpec(bits=4, group_size=128, sym=True)
FP16 = torch.float16


def _qt(spec: LayerSpec, out_features: int = 128, in_features: int = 256, device: str = "cpu") -> QuantizedTensor:
    g = torch.Generator().manual_seed(spec.bits * 1000 + spec.group_size * 2 + spec.sym)
    qt = quantize(torch.randn(out_features, in_features, generator=g) * 0.05, spec)
    return QuantizedTensor(qt.codes.to(device), qt.scales.to(device), qt.zeros.to(device), spec)


def _reasons(spec: LayerSpec, packing: str, device: str, dtype: torch.dtype, in_f: int, out_f: int) -> dict:
    return {b.name: r for b, r in candidates(spec, packing, device, dtype, in_f, out_f)}


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


# -- the GPTQ tensors handed to GPTQModel ---------------------------------------------------------------------------
CONVERSION_CASES = [(b, gs, sym) for b in (2, 3, 4, 8) for gs in (32, 128, -1) for sym in (True, False)]


@pytest.mark.parametrize(("bits", "group_size", "sym"), CONVERSION_CASES)
def test_gptqmodel_tensors_are_our_gptq_v2_packing(bits: int, group_size: int, sym: bool) -> None:
    qt = _qt(LayerSpec(bits=bits, group_size=group_size, sym=sym))
    ours = gptqmodel_tensors(qt)
    packed = get_packer("gptq_v2").pack(qt)  # zero points as-is: GPTQModel's internal format
    assert set(ours) == set(packed)
    for name, tensor in packed.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


@pytest.mark.parametrize(("bits", "word"), [(4, 0x11111111), (8, 0x01010101)])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_v2_zeros_are_v1_plus_gptqmodels_per_word_constant(bits: int, word: int, group_size: int) -> None:
    """GPTQModel turns v1 checkpoints into what its v2 kernels read by adding one per zero point, i.e. ``word`` per
    int32 (utils/model.py, convert_gptq_v1_to_v2_format_module); symmetric zero points never carry."""
    qt = _qt(LayerSpec(bits=bits, group_size=group_size, sym=True))
    v1 = get_packer("gptq").pack(qt)["qzeros"].to(torch.int64) & 0xFFFFFFFF
    v2 = gptqmodel_tensors(qt)["qzeros"].to(torch.int64) & 0xFFFFFFFF
    assert torch.equal((v1 + word) & 0xFFFFFFFF, v2)


# -- the wrapper, with a stand-in for the GPTQModel layer ------------------------------------------------------------
class _DequantKernel(nn.Module):
    """Stands in for a GPTQModel layer: reads the GPTQ tensors as GPTQModel's v2 kernels do,
    ``scales[g_idx] * (q - zeros[g_idx])``, and records the dtype it was called with."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int) -> None:
        super().__init__()
        g_idx = tensors["g_idx"].long()
        q = unpack_int32(tensors["qweight"], bits, dim=0).float()  # [in, out]
        zeros = unpack_int32(tensors["qzeros"], bits, dim=1).float()  # [G, out]
        self.weight = (tensors["scales"].float()[g_idx] * (q - zeros[g_idx])).t().to(FP16)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.dtype)
        return F.linear(x, self.weight)


class _Bridged(GptqModelQuantLinear):
    backend_name = "fake_gptqmodel"

    def _build_kernel(self, qt: QuantizedTensor) -> nn.Module:
        self.compute_dtype = FP16
        return _DequantKernel(gptqmodel_tensors(qt), qt.spec.bits)


def _pair(spec: LayerSpec, packing: str, dtype: torch.dtype = torch.float32):
    qt = _qt(spec)
    bias = torch.randn(128, generator=torch.Generator().manual_seed(5)) * 0.1
    return TorchQuantLinear.from_quantized(qt, packing, bias, dtype), _Bridged.from_quantized(qt, packing, bias, dtype)


@pytest.mark.parametrize(
    ("spec", "packing"),
    [
        (LayerSpec(bits=4, group_size=32, sym=False), "gptq_v2"),
        (LayerSpec(bits=4, group_size=128, sym=True), "auto_round:auto_gptq"),
        (LayerSpec(bits=8, group_size=-1, sym=True), "gptq"),
        (LayerSpec(bits=4, group_size=64, sym=False), "awq_gemm"),
        (LayerSpec(bits=8, group_size=32, sym=False), "pack-quantized"),
    ],
)
def test_wrapper_delegates_in_compute_dtype_and_adds_bias(spec: LayerSpec, packing: str) -> None:
    ref, bridged = _pair(spec, packing)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x), bridged(x)
    assert bridged.kernel.seen == [FP16]  # cast to the kernel's dtype ...
    assert got.dtype == torch.float32 and got.shape == expected.shape  # ... and back
    assert _rel_err(got, expected) <= 5e-3  # fp16 compute against the fp32 reference


def test_kernel_stays_out_of_the_module_tree_and_the_checkpoint() -> None:
    ref, bridged = _pair(W4, "gptq")
    assert isinstance(bridged.kernel, _DequantKernel)
    assert list(bridged.children()) == [] and list(bridged.parameters()) == []
    assert set(bridged.state_dict()) == set(ref.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert all(torch.equal(bridged.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_forward_before_post_init_says_so() -> None:
    layer = _Bridged(256, 128, W4, "gptq", False, FP16)
    with pytest.raises(RuntimeError, match=r"call post_init\(\)"):
        layer(torch.zeros(1, 256, dtype=FP16))


def test_a_device_move_drops_the_kernel_and_forward_rebuilds_it() -> None:
    _ref, bridged = _pair(W4, "gptq")
    kernel = bridged.kernel
    bridged.to(torch.device("cpu"))  # same device: kept
    assert bridged.kernel is kernel
    bridged.__dict__["_gptqmodel_device"] = torch.device("meta")  # as if built on another device
    bridged.to(torch.device("cpu"))
    assert bridged.kernel is None
    bridged(torch.zeros(1, 256))
    assert isinstance(bridged.kernel, _DequantKernel) and bridged.kernel is not kernel


class _BridgedOffloading(_Bridged):
    offload_checkpoint_on = ("cpu",)  # what happens on cuda / xpu, observable here


def test_on_an_accelerator_the_checkpoint_copy_leaves_the_device() -> None:
    """Only the kernel's copy of the weights stays where the layer runs; saving and rebuilding read the CPU copy."""
    qt = _qt(W4)
    bias = torch.randn(128, generator=torch.Generator().manual_seed(5)) * 0.1
    ref = TorchQuantLinear.from_quantized(qt, "gptq", bias, torch.float32)
    layer = _BridgedOffloading.from_quantized(qt, "gptq", bias, torch.float32)
    assert layer.qweight is None and layer.qzeros is None and layer.scales is None
    resident = {name for name, b in layer.named_buffers()}
    assert resident == {"bias", "device_marker"}
    assert set(layer.state_dict()) == set(ref.state_dict())
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in ref.state_dict().items())
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = layer(x)
        layer.__dict__["_gptqmodel_device"] = torch.device("meta")  # as if built on another device
        layer.to(torch.device("cpu"))
        assert layer.kernel is None
        torch.testing.assert_close(layer(x), before)  # rebuilt from the CPU copy
        assert _rel_err(before, ref(x)) <= 5e-3


# -- descriptors and selection -------------------------------------------------------------------------------------
def test_descriptors_mirror_gptqmodel_limits() -> None:
    marlin, exl = get_backend("marlin"), get_backend("exllamav2")
    assert (marlin.priority, marlin.devices, marlin.bits, marlin.sym) == (6, ("cuda",), (4, 8), (True,))
    assert (exl.priority, exl.devices, exl.bits, exl.sym) == (5, ("cuda",), (4,), (True, False))
    for backend in (marlin, exl):
        assert backend.requires == ("gptqmodel>=7.6,<7.7",) == (GPTQMODEL_REQUIREMENT,)
        assert backend.dtypes == (torch.float16, torch.bfloat16)
        assert backend.group_sizes == (-1, 32, 64, 128)
    assert marlin.quant_linear is MarlinQuantLinear and exl.quant_linear is ExllamaV2QuantLinear


def test_marlin_tile_is_either_orientation() -> None:
    assert tile_aligned(128, 64) and tile_aligned(64, 128) and tile_aligned(4096, 11008 // 64 * 64)
    assert not tile_aligned(192, 64) and not tile_aligned(64, 64)


def test_importing_needs_no_gptqmodel() -> None:
    code = (
        "import sys; sys.modules['gptqmodel'] = None\n"  # any `import gptqmodel` now raises
        "import signround.kernels as k\n"
        "assert {'marlin', 'exllamav2'} <= set(k.backend_names())\n"
        "assert sys.modules['gptqmodel'] is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture
def gptqmodel_installed(monkeypatch):
    """Pretend the gptqmodel requirement is met and the CUDA toolkit its kernel build needs is there (other
    requirements are still checked)."""
    import signround.kernels.exllamav2 as exllamav2_module
    import signround.kernels.marlin as marlin_module

    real = registry.missing_requirement
    monkeypatch.setattr(
        registry, "missing_requirement", lambda req: None if req == GPTQMODEL_REQUIREMENT else real(req)
    )
    for module in (marlin_module, exllamav2_module):
        monkeypatch.setattr(module, "cuda_toolkit_reason", lambda: None)


def test_cuda_toolkit_is_found_where_the_kernel_build_looks(monkeypatch, tmp_path) -> None:
    """GPTQModel compiles its kernels with torch's cpp_extension: CUDA_HOME / CUDA_PATH, else nvcc on PATH, else
    /usr/local/cuda, and the build needs bin/nvcc under it."""
    from signround.kernels import gptqmodel_bridge
    from signround.kernels.gptqmodel_bridge import cuda_home, cuda_toolkit_reason

    def reason() -> str | None:
        cuda_toolkit_reason.cache_clear()
        return cuda_toolkit_reason()

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU torch: no nvcc version to compare (next test)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    try:
        assert cuda_home() == str(tmp_path)
        assert f"CUDA_HOME={tmp_path} has no bin/nvcc" in reason()
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "nvcc").touch()
        assert reason() is None
        monkeypatch.delenv("CUDA_HOME")
        monkeypatch.setenv("CUDA_PATH", str(tmp_path))
        assert cuda_home() == str(tmp_path)
        monkeypatch.delenv("CUDA_PATH")
        monkeypatch.setattr(gptqmodel_bridge.shutil, "which", lambda name: str(tmp_path / "bin" / name))
        assert cuda_home() == str(tmp_path)  # the folder above the nvcc on PATH
        monkeypatch.setattr(gptqmodel_bridge.shutil, "which", lambda name: None)
        monkeypatch.setattr(gptqmodel_bridge.os.path, "exists", lambda path: False)  # no /usr/local/cuda
        assert cuda_home() is None
        assert "needs the CUDA toolkit's nvcc, which was not found" in reason()
    finally:
        cuda_toolkit_reason.cache_clear()


@pytest.mark.skipif(sys.platform == "win32", reason="the stand-in nvcc is a shell script")
def test_an_nvcc_of_another_cuda_major_version_is_refused_as_torchs_build_refuses_it(monkeypatch, tmp_path) -> None:
    """torch's cpp_extension runs `nvcc --version` and refuses a major version other than torch's own CUDA: a
    CUDA 12 toolkit beside a cu130 torch would fail GPTQModel's build minutes into from_pretrained."""
    from signround.kernels.gptqmodel_bridge import nvcc_version_reason

    nvcc = tmp_path / "nvcc"

    def banner(text: str) -> None:
        nvcc.write_text(f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\necho '{text}'\n")
        nvcc.chmod(0o755)

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    banner("Cuda compilation tools, release 12.4, V12.4.131")
    reason = nvcc_version_reason(nvcc)
    assert reason is not None and "CUDA 12.4" in reason and "install a CUDA 13.x toolkit" in reason
    banner("Cuda compilation tools, release 13.1, V13.1.80")
    assert nvcc_version_reason(nvcc) is None  # another minor version: torch only warns
    banner("no release line")
    assert nvcc_version_reason(nvcc) is None  # torch's check passes it too
    nvcc.write_text("not a program")
    nvcc.chmod(0o644)
    assert "does not run" in nvcc_version_reason(nvcc)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert nvcc_version_reason(nvcc) is None  # a CPU torch builds nothing for CUDA


def test_cuda_home_agrees_with_torchs_build_lookup() -> None:
    """Our lookup is written out (importing cpp_extension imports setuptools); it must find what torch's does.
    Run in a fresh interpreter: cpp_extension cannot be imported once the standard library's distutils is."""
    code = (  # CUDA_HOME itself is None on a CPU build of torch; the lookup it runs on CUDA builds is this one
        "from torch.utils.cpp_extension import _find_cuda_home\n"
        "from signround.kernels.gptqmodel_bridge import cuda_home\n"
        "assert cuda_home() == _find_cuda_home(), (cuda_home(), _find_cuda_home())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.usefixtures("gptqmodel_installed")
def test_without_the_cuda_toolkit_the_layer_goes_to_the_next_backend(monkeypatch, caplog) -> None:
    """A pip-only CUDA install has no nvcc: GPTQModel's first-use build would fail inside from_pretrained."""
    import signround.kernels.exllamav2 as exllamav2_module
    import signround.kernels.marlin as marlin_module
    from signround.kernels import gptqmodel_bridge

    monkeypatch.setattr(gptqmodel_bridge, "cuda_home", lambda: None)
    gptqmodel_bridge.cuda_toolkit_reason.cache_clear()
    try:
        missing = gptqmodel_bridge.cuda_toolkit_reason()
    finally:
        gptqmodel_bridge.cuda_toolkit_reason.cache_clear()
    assert missing is not None
    for module in (marlin_module, exllamav2_module):
        monkeypatch.setattr(module, "cuda_toolkit_reason", lambda: missing)
    reasons = _reasons(W4, "gptq", "cuda", FP16, 4096, 4096)
    assert reasons["marlin"] == reasons["exllamav2"] == missing
    with caplog.at_level(logging.INFO, logger="signround.kernels.registry"):
        assert select(W4, "gptq", "cuda", FP16, 4096, 4096).name not in ("marlin", "exllamav2")
    assert f"faster if installed: marlin ({missing})" in caplog.text  # the toolkit is worth a hint


def test_first_build_is_announced_once_per_kernel(caplog) -> None:
    from signround.kernels import gptqmodel_bridge

    gptqmodel_bridge.note_first_build.cache_clear()
    with caplog.at_level(logging.INFO, logger="signround.kernels.gptqmodel_bridge"):
        gptqmodel_bridge.note_first_build("marlin-test")
        gptqmodel_bridge.note_first_build("marlin-test")
    notices = [r.getMessage() for r in caplog.records if "marlin-test" in r.getMessage()]
    assert len(notices) == 1 and "the first build takes minutes" in notices[0]


@pytest.mark.skipif(
    registry.missing_requirement(GPTQMODEL_REQUIREMENT) is None, reason="gptqmodel is installed in this venv"
)
def test_without_gptqmodel_both_are_rejected_with_the_pip_line_and_hinted(caplog) -> None:
    reasons = _reasons(W4, "gptq", "cuda", FP16, 4096, 4096)
    for name in ("marlin", "exllamav2"):
        assert "pip install" in reasons[name] and GPTQMODEL_REQUIREMENT in reasons[name], reasons[name]
    registry._log_choice_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        chosen = select(W4, "gptq", "cuda", FP16, 4096, 4096)
    assert chosen.name not in ("marlin", "exllamav2")
    assert "faster if installed: " in caplog.text and "marlin (needs 'gptqmodel>=7.6,<7.7'" in caplog.text


@pytest.mark.usefixtures("gptqmodel_installed")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 128), (4, 32), (4, -1), (8, 128), (8, 64)])
def test_marlin_is_chosen_on_cuda(bits: int, group_size: int, dtype: torch.dtype) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=True)
    for packing in ("gptq", "auto_round:auto_gptq", "gptq_v2"):
        assert select(spec, packing, "cuda", dtype, 4096, 11008).name == "marlin"
    assert select(spec, "gptq", "cuda:0", dtype, 11008, 4096).name == "marlin"


@pytest.mark.usefixtures("gptqmodel_installed")
@pytest.mark.parametrize(
    ("spec", "packing", "in_f", "out_f", "marlin_reason"),
    [
        (LayerSpec(bits=4, group_size=128, sym=False), "gptq_v2", 4096, 4096, "sym=False not supported"),
        (LayerSpec(bits=4, group_size=128, sym=False), "awq_gemm", 4096, 4096, "sym=False not supported"),
        (W4, "gptq", 4096, 96, "out_features=96 is not a multiple of 64"),
        (LayerSpec(bits=4, group_size=64), "gptq", 192, 64, "not on Marlin's 64x128 tile"),
    ],
)
def test_exllamav2_is_chosen_where_marlin_cannot(spec, packing, in_f: int, out_f: int, marlin_reason: str) -> None:
    reasons = _reasons(spec, packing, "cuda", FP16, in_f, out_f)
    assert marlin_reason in reasons["marlin"] and reasons["exllamav2"] is None
    assert select(spec, packing, "cuda", FP16, in_f, out_f).name == "exllamav2"
    assert select(spec, packing, "cuda", torch.bfloat16, in_f, out_f).name == "exllamav2"


@pytest.mark.usefixtures("gptqmodel_installed")
def test_what_neither_can_run_names_the_reason() -> None:
    reasons = _reasons(W4, "gptq", "cpu", FP16, 4096, 4096)
    assert reasons["marlin"] == reasons["exllamav2"] == "device 'cpu' not in ['cuda']"
    reasons = _reasons(LayerSpec(bits=3, group_size=128), "gptq", "cuda", FP16, 4096, 4096)
    assert reasons["marlin"] == "bits=3 not in [4, 8]" and reasons["exllamav2"] == "bits=3 not in [4]"
    reasons = _reasons(LayerSpec(bits=8, group_size=128, sym=False), "gptq_v2", "cuda", FP16, 4096, 4096)
    assert reasons["marlin"].startswith("sym=False") and reasons["exllamav2"] == "bits=8 not in [4]"
    reasons = _reasons(LayerSpec(bits=4, group_size=256), "gptq", "cuda", FP16, 4096, 4096)
    assert reasons["marlin"] == reasons["exllamav2"] == "group_size=256 not in [-1, 32, 64, 128]"
    reasons = _reasons(W4, "gptq", "cuda", torch.float32, 4096, 4096)
    assert "activation dtype torch.float32" in reasons["marlin"] and "torch.float32" in reasons["exllamav2"]
    reasons = _reasons(W4, "gptq", "cuda", FP16, 65536 + 128, 4096)
    assert "16-bit indices" in reasons["exllamav2"] and reasons["marlin"] is None
    with pytest.raises(ValueError, match=r"backend 'marlin' cannot run the layer .*bits=3 not in \[4, 8\]"):
        select(LayerSpec(bits=3, group_size=128), "gptq", "cuda", FP16, 4096, 4096, requested="marlin")


@pytest.mark.usefixtures("gptqmodel_installed")
def test_machines_gptqmodels_kernels_do_not_run_on_are_rejected(monkeypatch) -> None:
    import signround.kernels.marlin as marlin_module

    monkeypatch.setattr(marlin_module, "cuda_capabilities", lambda: ((8, 0), (7, 0)))
    assert (
        "compute capability >= 7.5; a visible GPU has 7.0" in _reasons(W4, "gptq", "cuda", FP16, 4096, 4096)["marlin"]
    )
    assert select(W4, "gptq", "cuda", FP16, 4096, 4096).name == "exllamav2"
    monkeypatch.setattr(marlin_module, "cuda_capabilities", lambda: ((7, 5),))
    assert select(W4, "gptq", "cuda", FP16, 4096, 4096).name == "marlin"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    reasons = _reasons(W4, "gptq", "cuda", FP16, 4096, 4096)
    assert "does not support ROCm" in reasons["marlin"] and "does not support ROCm" in reasons["exllamav2"]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(sys, "platform", "win32")
    reasons = _reasons(W4, "gptq", "cuda", FP16, 4096, 4096)
    assert "Marlin kernel runs on ['linux'], not 'win32'" in reasons["marlin"] and reasons["exllamav2"] is None


# -- the kernels themselves (CUDA + gptqmodel) ---------------------------------------------------------------------
def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    if importlib.util.find_spec("gptqmodel") is None:
        return f"needs gptqmodel (pip install '{GPTQMODEL_REQUIREMENT}')"
    return registry.missing_requirement(GPTQMODEL_REQUIREMENT)


needs_gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))

# Against the torch reference in the same activation dtype, relative to the output's magnitude: both round to
# fp16 / bf16 (Marlin's bf16 path also rounds the fp16 scales to bf16).  Measured on an H100 (2026-11-26), the
# largest over these cases: fp16 8.9e-4 (marlin), 2.0e-3 (exllamav2, which accumulates in fp16); bf16 7.7e-3.
GPU_TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}

GPU_CASES = [
    (cls, bits, gs, sym, dtype)
    for cls, bits_list, syms in ((MarlinQuantLinear, (4, 8), (True,)), (ExllamaV2QuantLinear, (4,), (True, False)))
    for bits in bits_list
    for gs in (32, 128, -1)
    for sym in syms
    for dtype in (torch.float16, torch.bfloat16)
]


@needs_gpu
@pytest.mark.parametrize(("cls", "bits", "group_size", "sym", "dtype"), GPU_CASES)
def test_cuda_kernel_matches_torch_reference(cls, bits: int, group_size: int, sym: bool, dtype) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    qt = _qt(spec, out_features=256, in_features=512, device="cuda")
    packing = "gptq" if sym else "gptq_v2"
    bias = (torch.randn(256, generator=torch.Generator().manual_seed(3)) * 0.1).to("cuda", dtype)
    ref = TorchQuantLinear.from_quantized(qt, packing, bias, dtype)
    fast = cls.from_quantized(qt, packing, bias, dtype)
    assert fast.kernel is not None and fast.kernel.qweight.is_cuda
    g = torch.Generator(device="cuda").manual_seed(4)
    for shape in ((1, 512), (3, 7, 512), (64, 512)):  # decode, batched, above ExLlamaV2's 50-row GEMM
        x = torch.randn(*shape, generator=g, device="cuda", dtype=dtype)
        with torch.no_grad():
            expected, got = ref(x), fast(x)
        assert got.dtype == dtype and got.shape == expected.shape
        err = _rel_err(got, expected)
        print(f"{cls.backend_name} bits={bits} gs={group_size} sym={sym} {dtype} x{tuple(shape)}: rel err {err:.2e}")
        assert err <= GPU_TOL[dtype]
    assert set(fast.state_dict()) == set(ref.state_dict())
    # the checkpoint tensors wait in CPU memory (the kernel holds its own copy on the GPU); the bias stays there
    assert all(torch.equal(fast.state_dict()[k].to(v.device), v) for k, v in ref.state_dict().items())
    assert {k for k, v in fast.state_dict().items() if v.is_cuda} == {"bias"}


@needs_gpu
def test_cuda_layers_of_a_device_share_exllamav2_scratch(monkeypatch) -> None:
    # a fresh registry: layers of earlier tests (kept alive by a failure's traceback, or not yet collected) may
    # still hold a larger buffer, which every layer here would then share
    monkeypatch.setattr(exllamav2_module, "_SCRATCH", weakref.WeakValueDictionary())
    small = ExllamaV2QuantLinear.from_quantized(_qt(W4, 128, 256, "cuda"), "gptq", None, FP16)
    big = ExllamaV2QuantLinear.from_quantized(_qt(W4, 256, 512, "cuda"), "gptq", None, FP16)
    smaller = ExllamaV2QuantLinear.from_quantized(_qt(W4, 128, 256, "cuda"), "gptq", None, FP16)
    assert big.__dict__["_scratch"] is smaller.__dict__["_scratch"] is not small.__dict__["_scratch"]


@needs_gpu
def test_cuda_marlin_refuses_zero_points_it_cannot_represent() -> None:
    qt = _qt(W4, 128, 256, "cuda")
    qt.zeros[0, 0] = 7  # a symmetric layer stored with a zero point other than 2^(bits-1)
    with pytest.raises(ValueError, match="zero point fixed at 8"):
        MarlinQuantLinear.from_quantized(qt, "gptq_v2", None, FP16)


def test_exllamav2_runs_on_the_default_stream_only(monkeypatch) -> None:
    """GPTQModel's ExLlamaV2 kernels launch on CUDA's default stream whatever torch's current stream is."""
    streams = {"current": "default", "capturing": False}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams["current"])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: "default")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: streams["capturing"])
    assert exllamav2_module.stream_reason(torch.device("cuda")) is None
    streams["current"] = "side"
    reason = exllamav2_module.stream_reason(torch.device("cuda"))
    assert "only on the default CUDA stream" in reason and "backend='marlin' or 'triton'" in reason
    assert "graph" not in reason.split(":")[0]
    streams["capturing"] = True
    assert "(a CUDA graph is being captured)" in exllamav2_module.stream_reason(torch.device("cuda"))


@needs_gpu
def test_cuda_marlin_graph_replay_equals_eager() -> None:
    layer = MarlinQuantLinear.from_quantized(_qt(W4, 256, 512, "cuda"), "gptq", None, FP16)
    replayed, eager = graph_replay_and_eager(layer, torch.randn(1, 512, device="cuda", dtype=FP16))
    torch.testing.assert_close(replayed, eager, rtol=1e-3, atol=1e-3)


@needs_gpu
def test_cuda_exllamav2_refuses_other_streams_and_graph_capture() -> None:
    layer = ExllamaV2QuantLinear.from_quantized(_qt(W4, 256, 512, "cuda"), "gptq", None, FP16)
    x = torch.randn(1, 512, device="cuda", dtype=FP16)
    with torch.no_grad():
        layer(x)  # the default stream
        with torch.cuda.stream(torch.cuda.Stream()), pytest.raises(RuntimeError, match="default CUDA stream"):
            layer(x)
        graph = torch.cuda.CUDAGraph()  # capture runs on a side stream; said apart from a plain other stream
        with pytest.raises(RuntimeError, match=r"a CUDA graph is being captured"), torch.cuda.graph(graph):
            layer(x)
