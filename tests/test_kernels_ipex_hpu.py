"""IPEX and HPU backends: neither stack can run here (IPEX imports only with the torch it was built for, Gaudi's
stack comes with the hardware), so their selection logic is tested everywhere and their repacking against a
stand-in for the vendor op that follows the op's documented layout."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from signround.kernels import candidates, get_backend, ipex, registry, select
from signround.kernels.hpu import HpuQuantLinear, hpu_tensors
from signround.kernels.torch import TorchQuantLinear
from signround.packing.awq import unpack_awq
from signround.quant.int import dequantize, quantize
from signround.schemes import LayerSpec

W4 = LayerSpec(bits=4, group_size=128, sym=True)
PACKING = "auto_round:auto_gptq"


def _reasons(spec: LayerSpec, device: str, dtype: torch.dtype, in_f: int = 256, out_f: int = 512) -> dict:
    return {b.name: r for b, r in candidates(spec, PACKING, device, dtype, in_f, out_f)}


# -- IPEX ---------------------------------------------------------------------------------------------------------
def test_ipex_is_rejected_with_the_pip_line_when_missing() -> None:
    if importlib.util.find_spec(ipex.IPEX_MODULE) is not None:
        pytest.skip("intel-extension-for-pytorch is installed here; the missing-package path cannot be observed")
    reason = _reasons(W4, "cpu", torch.bfloat16)["ipex"]
    assert "pip install 'intel-extension-for-pytorch>=2.4'" in reason
    with pytest.raises(ValueError, match=r"backend .ipex. cannot run the layer .*intel-extension-for-pytorch"):
        select(W4, PACKING, "cpu", torch.bfloat16, 256, 512, requested="ipex")


def test_ipex_descriptor_limits() -> None:
    assert _reasons(LayerSpec(bits=8, group_size=128), "xpu", torch.float16)["ipex"] == "bits=8 not in [4]"
    assert _reasons(W4, "cuda", torch.float16)["ipex"] == "device 'cuda' not in ['cpu', 'xpu']"
    assert _reasons(W4, "cpu", torch.bfloat16, out_f=516)["ipex"] == "out_features=516 is not a multiple of 8"


def test_ipex_that_fails_to_import_is_rejected_with_why(monkeypatch) -> None:
    """The usual case with a pinned torch: IPEX installed for another torch raises on import."""
    ipex.ipex_import_error.cache_clear()
    monkeypatch.setattr(ipex.importlib.util, "find_spec", lambda name: object())

    def broken_import(name: str):
        raise RuntimeError("Intel Extension for PyTorch 2.8.0 needs torch 2.8.*")

    monkeypatch.setattr(ipex.importlib, "import_module", broken_import)
    monkeypatch.setattr(registry, "missing_requirement", lambda requirement: None)  # "installed"
    try:
        reason = _reasons(W4, "cpu", torch.bfloat16)["ipex"]
        assert "does not import with torch" in reason and "needs torch 2.8" in reason
        assert select(W4, PACKING, "cpu", torch.bfloat16, 256, 512).name in ("native", "torch_int4")
    finally:
        ipex.ipex_import_error.cache_clear()


def test_ipex_is_chosen_on_xpu_when_usable(monkeypatch) -> None:
    monkeypatch.setattr(registry, "missing_requirement", lambda requirement: None)
    monkeypatch.setattr(ipex, "ipex_import_error", lambda: None)
    assert select(W4, PACKING, "xpu", torch.float16, 256, 512).name == "ipex"
    # 3-bit on XPU: only the torch reference
    assert select(LayerSpec(bits=3, group_size=128), PACKING, "xpu", torch.float16, 256, 512).name == "torch"


@pytest.mark.parametrize("sym", [True, False])
def test_ipex_awq_tensors_hold_the_layer(sym: bool) -> None:
    """What post_init hands IPEX (AWQ GEMM layout, zero points as-is) decodes back to the layer's values."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, LayerSpec(bits=4, group_size=64, sym=sym))
    tensors = ipex.awq_tensors(qt)
    assert torch.equal(unpack_awq(tensors["qweight"]).t().long(), qt.codes.long())
    assert torch.equal(unpack_awq(tensors["qzeros"]).t().long(), qt.zeros.long())
    assert torch.equal(tensors["scales"].t().float(), qt.scales.half().float())


# -- HPU ----------------------------------------------------------------------------------------------------------
def _reference_convert_from_uint4(qweight, scales, qzeros, dtype):
    """Stand-in for ``torch.ops.hpu.convert_from_uint4`` written from the op's contract: eight 4-bit values per
    int32 along the output dimension, low nibble first; weight ``[in, out] = (q - z) * s`` per input group."""

    def nibbles(words: torch.Tensor) -> torch.Tensor:
        w = words.to(torch.int64) & 0xFFFFFFFF
        return torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(words.shape[0], -1)

    q, z = nibbles(qweight).to(dtype), nibbles(qzeros).to(dtype)
    group = q.shape[0] // scales.shape[0]
    return (q - z.repeat_interleave(group, 0)) * scales.to(dtype).repeat_interleave(group, 0)


def test_hpu_descriptor_and_missing_stack() -> None:
    reasons = _reasons(W4, "hpu", torch.bfloat16)
    if importlib.util.find_spec("habana_frameworks") is None:
        assert "Habana" in reasons["hpu"] and "habana_frameworks" in reasons["hpu"]
    assert reasons["torch"] == "device 'hpu' not in ['cpu', 'cuda', 'xpu']"
    assert _reasons(W4, "cpu", torch.bfloat16)["hpu"] == "device 'cpu' not in ['hpu']"
    assert _reasons(W4, "hpu", torch.bfloat16, out_f=528)["hpu"] == "out_features=528 is not a multiple of 32"
    assert get_backend("hpu").priority > get_backend("torch").priority


@pytest.mark.parametrize(
    ("sym", "packing"), [(True, "auto_round:auto_gptq"), (False, "auto_round"), (False, "gptq_v2")]
)
def test_hpu_layer_matches_torch_reference_through_the_op_contract(sym: bool, packing: str) -> None:
    g = torch.Generator().manual_seed(5)
    qt = quantize(torch.randn(64, 256, generator=g), LayerSpec(bits=4, group_size=32, sym=sym))
    bias = torch.randn(64, generator=g)
    HpuQuantLinear.convert_op = staticmethod(_reference_convert_from_uint4)
    try:
        layer = HpuQuantLinear.from_quantized(qt, packing, bias, torch.float32)
    finally:
        HpuQuantLinear.convert_op = None
    ref = TorchQuantLinear.from_quantized(qt, packing, bias, torch.float32)
    x = torch.randn(3, 256, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-4)
    assert set(layer.state_dict()) == set(ref.state_dict())  # the repacked tensors are not saved
    shapes = {k: tuple(v.shape) for k, v in hpu_tensors(qt, torch.bfloat16).items()}
    assert shapes == {"qweight": (256, 8), "qzeros": (8, 8), "scales": (8, 64)}
    assert torch.equal(
        _reference_convert_from_uint4(**hpu_tensors(qt, torch.float32), dtype=torch.float32).t(),
        dequantize(qt, torch.float32),
    )


# -- the vendor kernels themselves: run where their stack exists, skip with the reason elsewhere --------------------
def _unavailable(name: str) -> str | None:
    return get_backend(name).availability()


@pytest.mark.skipif(_unavailable("ipex") is not None, reason=f"ipex kernel cannot run here: {_unavailable('ipex')}")
def test_ipex_kernel_matches_torch_reference() -> None:
    from signround.kernels.ipex import IpexQuantLinear

    g = torch.Generator().manual_seed(6)
    qt = quantize(torch.randn(128, 256, generator=g) * 0.05, LayerSpec(bits=4, group_size=32, sym=False))
    bias = torch.randn(128, generator=g) * 0.1
    fast = IpexQuantLinear.from_quantized(qt, "auto_round", bias, torch.bfloat16)
    ref = TorchQuantLinear.from_quantized(qt, "auto_round", bias, torch.bfloat16)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got, expected = fast(x).float(), ref(x).float()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 2e-2


@pytest.mark.skipif(
    _unavailable("hpu") is not None or not registry.device_present("hpu"),
    reason=f"hpu kernel cannot run here: {_unavailable('hpu') or 'no HPU device'}",
)
def test_hpu_kernel_matches_torch_reference() -> None:
    g = torch.Generator().manual_seed(7)
    qt = quantize(torch.randn(128, 256, generator=g) * 0.05, LayerSpec(bits=4, group_size=32, sym=True))
    qt_hpu = type(qt)(qt.codes.to("hpu"), qt.scales.to("hpu"), qt.zeros.to("hpu"), qt.spec)
    fast = HpuQuantLinear.from_quantized(qt_hpu, PACKING, None, torch.bfloat16)
    ref = TorchQuantLinear.from_quantized(qt, PACKING, None, torch.bfloat16)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        got, expected = fast(x.to("hpu")).cpu().float(), ref(x).float()
    assert float((got - expected).abs().max() / expected.abs().max()) <= 2e-2
