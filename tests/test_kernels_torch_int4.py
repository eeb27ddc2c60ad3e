"""torch_int4 (aten._weight_int4pack_mm_for_cpu) against the torch reference backend."""

from __future__ import annotations

import pytest
import torch
from kernel_pairs import reference_and_kernel, rel_err

from signround.kernels.torch import TorchQuantLinear
from signround.kernels.torch_int4 import (
    DENSE_MIN_ROWS,
    TorchInt4QuantLinear,
    decode_int4pack,
    kernel_available,
    layout_mismatch,
)
from signround.packing import get_packer
from signround.quant.int import dequantize, quantize
from signround.schemes import LayerSpec
from signround.tuning.block import fast_bf16

pytestmark = pytest.mark.skipif(kernel_available() is not None, reason=str(kernel_available()))

# bf16 activations (the kernel's fast path, taken on every CPU) carry ~3 significant digits: outputs agree with the
# float32 reference to within 1 % of the output's magnitude; the dense path in fp32 (CPUs without native bf16) is
# exact up to summation order.
BF16_TOL = 1e-2


def _layers(spec: LayerSpec, packing: str, dtype: torch.dtype, out_features: int = 96, in_features: int = 256):
    seed = spec.bits * 100 + spec.group_size
    return reference_and_kernel(TorchInt4QuantLinear, spec, packing, dtype, out_features, in_features, seed)


CASES = [
    (gs, sym, packing)
    for gs in (32, 64, 128, 256)
    for sym in (True, False)
    for packing in ("auto_round", "auto_round:auto_gptq", "gptq_v2", "awq_gemm", "pack-quantized")
    if not (packing == "auto_round:auto_gptq" and not sym) and not (packing == "awq_gemm" and sym)
]


@pytest.mark.parametrize(("group_size", "sym", "packing"), CASES)
def test_matches_torch_reference_fp32(group_size: int, sym: bool, packing: str) -> None:
    ref, fast = _layers(LayerSpec(bits=4, group_size=group_size, sym=sym), packing, torch.float32)
    x = torch.randn(3, 7, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(x), fast(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert rel_err(got, expected) <= BF16_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_reference_half(dtype: torch.dtype) -> None:
    ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=False), "auto_round", dtype)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        expected, got = ref(x), fast(x)
    assert got.dtype == dtype
    assert rel_err(got, expected) <= BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_runs_in_bf16_and_the_dense_path_where_bf16_is_native(dtype: torch.dtype) -> None:
    _ref, fast = _layers(LayerSpec(bits=4, group_size=32), "auto_round", dtype)
    assert fast.compute_dtype == fast.scales_offsets.dtype == torch.bfloat16
    assert fast.dense_dtype == (torch.bfloat16 if fast_bf16(torch.device("cpu")) else torch.float32)
    assert fast.dense_weight().dtype == fast.dense_dtype


def test_saving_still_writes_the_checkpoint_layout() -> None:
    ref, fast = _layers(LayerSpec(bits=4, group_size=64), "auto_round", torch.float32)
    assert set(fast.state_dict()) == set(ref.state_dict())  # the repacked buffers are not persistent
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize(("out_features", "in_features"), [(16, 32), (48, 64), (64, 256), (80, 64), (192, 576)])
def test_decode_int4pack_inverts_torchs_packing(out_features: int, in_features: int) -> None:
    """Full 64-row blocks and every tail size the backend accepts (out % 16 == 0)."""
    codes = torch.randint(0, 16, (out_features, in_features), generator=torch.Generator().manual_seed(out_features))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    assert torch.equal(decode_int4pack(packed, out_features, in_features).long(), codes)
    assert layout_mismatch() is None


def test_only_one_copy_of_the_codes_stays_resident() -> None:
    """After post_init the checkpoint-format tensors are gone; saving rebuilds them bit-exactly."""
    ref, fast = _layers(
        LayerSpec(bits=4, group_size=32, sym=False), "gptq_v2", torch.float32
    )  # 96 rows: a 64-block + a tail
    assert fast.qweight is None and fast.qzeros is None and fast.scales is None
    resident = sum(b.numel() * b.element_size() for b in fast.buffers())
    checkpoint = sum(v.numel() * v.element_size() for v in ref.state_dict().values())
    assert resident < 1.25 * checkpoint  # codes once (0.5 B/weight) + the kernel's table + exact scales/zeros
    fast_state = fast.state_dict()
    assert set(fast_state) == set(ref.state_dict())
    assert all(torch.equal(fast_state[k], v) for k, v in ref.state_dict().items())
    qt_ref, qt_fast = ref.quantized_tensor(), fast.quantized_tensor()
    assert torch.equal(qt_fast.codes.long(), qt_ref.codes.long()) and torch.equal(qt_fast.scales, qt_ref.scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_inputs_take_the_dense_path_and_agree(dtype: torch.dtype) -> None:
    """From DENSE_MIN_ROWS rows on, the layer dequantizes to dense (bf16) and matmuls; same numbers as the kernel."""
    ref, fast = _layers(LayerSpec(bits=4, group_size=64, sym=True), "auto_round:auto_gptq", dtype)
    x = torch.randn(DENSE_MIN_ROWS + 9, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        dense, expected = fast(x), ref(x)
        kernel = torch.cat([fast(x[i : i + 1]) for i in range(x.shape[0])])  # one row at a time: the int4 kernel
    assert rel_err(dense, expected) <= BF16_TOL
    assert rel_err(kernel, dense) <= BF16_TOL
    weight = fast.dense_weight().float()
    assert rel_err(weight, dequantize(ref.quantized_tensor(), torch.float32)) <= BF16_TOL


def test_matches_torch_reference_on_a_stories260k_layer(stories_q_proj) -> None:
    """A trained layer (real weight statistics), with inputs of the scale the model feeds it."""
    weight, x = stories_q_proj
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    ref, fast = reference_and_kernel(
        TorchInt4QuantLinear, spec, "auto_round:auto_gptq", torch.float32, *weight.shape, 0, weight, with_bias=False
    )
    with torch.no_grad():
        expected = ref(x)
        for rows in (1, x.shape[1]):  # the int4 kernel (decode) and, at 48 rows with the threshold lowered, dense
            fast.dense_min_rows = 2 if rows > 1 else 1 << 30
            got = fast(x[:, :rows])
            assert rel_err(got, expected[:, :rows]) <= BF16_TOL


@pytest.mark.parametrize(
    ("bits", "sym", "packing"), [(2, True, "auto_round:auto_gptq"), (3, False, "auto_round"), (3, True, "gptq")]
)
def test_2_and_3_bit_layers_run_as_4_bit_and_save_exactly(bits: int, sym: bool, packing: str) -> None:
    """Codes below 16 dequantize the same way in the 4-bit kernel; saving rebuilds the 2/3-bit checkpoint."""
    ref, fast = _layers(LayerSpec(bits=bits, group_size=32, sym=sym), packing, torch.float32)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ref(x)
        for threshold in (1 << 30, 1):  # the int4 kernel, then the dense path
            fast.dense_min_rows = threshold
            assert rel_err(fast(x), expected) <= BF16_TOL
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("layer_cls", [TorchQuantLinear, TorchInt4QuantLinear])
def test_dtype_casts_leave_quantization_state_alone(layer_cls) -> None:
    """``model.to(torch.bfloat16)`` (which transformers allows on quantized models) casts bias only: checkpoint
    scales keep their precision for saving, kernel tables keep the dtype the kernel reads."""
    qt = quantize(torch.randn(96, 256, generator=torch.Generator().manual_seed(9)) * 0.05, LayerSpec(bits=4))
    layer = layer_cls.from_quantized(qt, "auto_round", torch.zeros(96), torch.float32)
    before = {name: buf.clone() for name, buf in layer.state_dict().items() if name != "bias"}
    dtypes = {name: buf.dtype for name, buf in layer.named_buffers() if name != "bias"}
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = layer(x)
        layer.to(torch.bfloat16)
        got = layer(x.bfloat16())
    assert {name: buf.dtype for name, buf in layer.named_buffers() if name != "bias"} == dtypes
    assert layer.bias.dtype == torch.bfloat16
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items())
    assert got.dtype == torch.bfloat16 and rel_err(got, expected) <= BF16_TOL


def test_without_native_bf16_the_dense_path_computes_in_fp32(monkeypatch) -> None:
    """An AVX2-only CPU: the kernel still takes bf16 (its fast path there too), long inputs go dense in fp32."""
    from signround.kernels import repacked

    monkeypatch.setattr(repacked, "fast_bf16", lambda device: False)
    ref, fast = _layers(LayerSpec(bits=4, group_size=64, sym=False), "auto_round", torch.float32)
    assert (fast.compute_dtype, fast.dense_dtype) == (torch.bfloat16, torch.float32)
    x = torch.randn(DENSE_MIN_ROWS, 256, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)
        assert rel_err(fast(x[:3]), ref(x[:3])) <= BF16_TOL


def test_symmetric_layers_keep_no_zero_points_and_still_save_exactly() -> None:
    ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=True), "auto_round:auto_gptq", torch.float32)
    assert fast.saved_zeros is None
    _ref_a, asym = _layers(LayerSpec(bits=4, group_size=32, sym=False), "auto_round", torch.float32)
    assert asym.saved_zeros is not None
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize(
    ("group_size", "in_features", "kernel_group"), [(-1, 256, 256), (-1, 96, 32), (512, 1024, 256)]
)
def test_groups_larger_than_the_kernels_run_as_several_kernel_groups(group_size, in_features, kernel_group) -> None:
    """Per-channel and 512-wide groups: split into the largest kernel group dividing them, values repeated."""
    g = torch.Generator().manual_seed(12)
    qt = quantize(torch.randn(64, in_features, generator=g) * 0.05, LayerSpec(bits=4, group_size=group_size, sym=False))
    ref = TorchQuantLinear.from_quantized(qt, "auto_round", None, torch.float32)
    fast = TorchInt4QuantLinear.from_quantized(qt, "auto_round", None, torch.float32)
    assert fast.kernel_group_size == kernel_group
    assert fast.scales_offsets.shape == (in_features // kernel_group, 64, 2)
    x = torch.randn(5, in_features, generator=g)
    with torch.no_grad():
        for threshold in (1 << 30, 1):  # the int4 kernel, then the dense path
            fast.dense_min_rows = threshold
            assert rel_err(fast(x), ref(x)) <= BF16_TOL
    assert all(torch.equal(fast.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_exact_copies_are_row_major_whatever_the_packer_returns() -> None:
    """GPTQ-family packers unpack to transposed views; the kept scales / zero points are row-major copies, because
    the dense path's arithmetic with [out, in] codes runs several times slower on the transposed layout."""
    ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=False), "auto_round", torch.float32)
    assert not get_packer("auto_round").unpack(ref.state_dict(), fast.spec, 256, 96).scales.is_contiguous()
    assert fast.saved_scales.is_contiguous() and fast.saved_zeros.is_contiguous()
