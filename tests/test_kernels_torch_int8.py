"""torch_int8 (aten._weight_int8pack_mm, one call per group) against the torch reference backend."""

from __future__ import annotations

import pytest
import torch
from kernel_pairs import reference_and_kernel, rel_err

from signround.kernels import candidates, select
from signround.kernels.torch_int8 import DENSE_MIN_ROWS, TorchInt8QuantLinear, kernel_available
from signround.schemes import LayerSpec

pytestmark = pytest.mark.skipif(kernel_available() is not None, reason=str(kernel_available()))

# bf16 activations and bf16 scales in the kernel, per-group results rounded to bf16 before an fp32 sum: within 1 %
# of the output's magnitude, as torch_int4; 2 % for bf16 outputs, which both sides round to bf16 (as the Triton tests).
BF16_TOL = 1e-2
OUT, IN = 96, 256


def _layers(spec: LayerSpec, packing: str, dtype: torch.dtype, weight: torch.Tensor | None = None):
    return reference_and_kernel(TorchInt8QuantLinear, spec, packing, dtype, OUT, IN, spec.group_size + 8, weight)


@pytest.mark.parametrize("group_size", [16, 32, 128, -1])
@pytest.mark.parametrize("packing", ["auto_round", "auto_round:auto_gptq", "gptq_v2", "pack-quantized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_reference_on_both_paths(group_size: int, packing: str, dtype: torch.dtype) -> None:
    ref, fast = _layers(LayerSpec(bits=8, group_size=group_size, sym=True), packing, dtype)
    x = torch.randn(3, DENSE_MIN_ROWS, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else BF16_TOL
    with torch.no_grad():
        expected = ref(x)
        for rows in (1, 5, DENSE_MIN_ROWS):  # per-group kernel calls for a few rows, the dense path from 16
            got = fast(x[:, :rows])
            assert got.shape == expected[:, :rows].shape and got.dtype == dtype
            assert rel_err(got, expected[:, :rows]) <= tol, rows


def test_only_one_copy_of_the_codes_stays_resident_and_saving_is_exact() -> None:
    ref, fast = _layers(LayerSpec(bits=8, group_size=32, sym=True), "auto_round:auto_gptq", torch.float32)
    assert fast.qweight is None and fast.qzeros is None and fast.scales is None
    assert fast.int8_weight.dtype == torch.int8 and fast.int8_weight.numel() == OUT * IN
    assert fast.saved_zeros is None and fast.zero_term is None  # symmetric: no zero point copy, no correction
    resident = sum(b.numel() * b.element_size() for b in fast.buffers())
    checkpoint = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
    assert resident < 1.1 * checkpoint  # codes once (1 B/weight) + bf16 and exact scales
    state = fast.state_dict()
    assert set(state) == set(ref.state_dict()) and all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


def test_zero_points_off_the_midpoint_are_exact_too() -> None:
    """The backend is selected for symmetric layers, but a checkpoint whose zero points are not all 128 still
    computes (q - zero) * scale, through the fp32 correction term, and saves them back."""
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5)) * 0.02 + 0.01
    ref, fast = _layers(LayerSpec(bits=8, group_size=64, sym=False), "auto_round", torch.float32, weight)
    assert fast.zero_term is not None and fast.saved_zeros is not None
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) <= BF16_TOL
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_an_unaligned_input_view_is_copied_not_misread() -> None:
    """The kernel's AVX-512 loads assume 32-byte aligned rows; a view starting mid-buffer must still be right."""
    ref, fast = _layers(LayerSpec(bits=8, group_size=-1, sym=True), "auto_round", torch.bfloat16)
    backing = torch.randn(IN + 3, generator=torch.Generator().manual_seed(7)).bfloat16()
    x = backing[3:].view(1, IN)  # 6 bytes past an aligned start
    assert x.data_ptr() % 32
    with torch.no_grad():
        assert rel_err(fast(x), ref(x.clone())) <= BF16_TOL


def test_selection_takes_symmetric_8_bit_cpu_layers_whose_groups_fit_the_kernel(monkeypatch) -> None:
    from signround.kernels import registry

    monkeypatch.delitem(registry._BACKENDS, "native")  # ranks above torch_int8 where a C compiler exists
    w8 = LayerSpec(bits=8, group_size=32, sym=True)
    assert select(w8, "auto_round:auto_gptq", "cpu", torch.float32, IN, OUT).name == "torch_int8"
    reasons = {b.name: r for b, r in candidates(LayerSpec(bits=8, group_size=40), "auto_round", "cpu",
                                                torch.bfloat16, 160, 64)}  # fmt: skip
    assert reasons["torch_int8"] == "group of 40 input features is not a multiple of 16 (the kernel's vector width)"
    asym = candidates(LayerSpec(bits=8, group_size=32, sym=False), "auto_round", "cpu", torch.bfloat16, IN, OUT)
    assert dict((b.name, r) for b, r in asym)["torch_int8"].startswith("sym=False not supported")
    assert select(LayerSpec(bits=8, group_size=32, sym=False), "auto_round", "cpu", torch.bfloat16, IN, OUT).name == (
        "torch"
    )


def test_dtype_casts_leave_quantization_state_alone() -> None:
    _ref, fast = _layers(LayerSpec(bits=8, group_size=32, sym=True), "auto_round", torch.float32)
    dtypes = {name: buf.dtype for name, buf in fast.named_buffers() if name != "bias"}
    before = {name: buf.clone() for name, buf in fast.state_dict().items() if name != "bias"}
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = fast(x)
        fast.to(torch.bfloat16)
        got = fast(x.bfloat16())
    assert {name: buf.dtype for name, buf in fast.named_buffers() if name != "bias"} == dtypes
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in before.items())
    assert rel_err(got, expected) <= BF16_TOL


def test_matches_torch_reference_on_a_stories260k_layer(stories_q_proj) -> None:
    """A trained layer (real weight statistics), with inputs of the scale the model feeds it."""
    weight, x = stories_q_proj
    spec = LayerSpec(bits=8, group_size=32, sym=True)
    ref, fast = reference_and_kernel(
        TorchInt8QuantLinear, spec, "auto_round:auto_gptq", torch.float32, *weight.shape, 0, weight, with_bias=False
    )
    with torch.no_grad():
        expected = ref(x)
        for rows in (1, 8, x.shape[1]):  # per-group kernel calls, then (48 rows) the dense path
            assert rel_err(fast(x[:, :rows]), expected[:, :rows]) <= BF16_TOL
