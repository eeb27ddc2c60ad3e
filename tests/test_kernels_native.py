"""native (our C kernel, compiled here at first use) against the torch reference backend, plus its build."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from kernel_pairs import reference_and_kernel, rel_err

from signround.kernels import candidates, cbuild, select
from signround.kernels.native import (
    BLOCK_ROWS,
    DENSE_MIN_ROWS,
    SOURCE,
    NativeQuantLinear,
    kernel_problem,
    load_kernel,
)
from signround.quant.int import dequantize, quantize
from signround.schemes import LayerSpec

pytestmark = pytest.mark.skipif(kernel_problem() is not None, reason=str(kernel_problem()))

# float32 activations are read as they are and products summed in float32: the same arithmetic as the reference up
# to summation order.  bf16 / fp16 outputs are rounded once, as the reference's are.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
OUT, IN = 96, 256  # 96 rows: one full block of 64 and a tail block of 32


def _layers(spec: LayerSpec, packing: str, dtype: torch.dtype, out_features: int = OUT, in_features: int = IN):
    seed = spec.bits * 100 + spec.group_size
    return reference_and_kernel(NativeQuantLinear, spec, packing, dtype, out_features, in_features, seed)


CASES = [
    (bits, gs, sym, packing)
    for bits in (2, 3, 4, 8)
    for gs in (32, 128, -1)
    for sym in (True, False)
    for packing in ("auto_round", "gptq_v2", "awq_gemm", "pack-quantized")
    if not (packing == "awq_gemm" and (sym or bits != 4))
    and not (packing == "gptq_v2" and bits == 3 and gs == -1)
    and not (bits == 8 and gs == 128)  # keeps the matrix small: 8-bit at G32 and per channel
]


@pytest.mark.parametrize(("bits", "group_size", "sym", "packing"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_reference_on_both_paths(bits: int, group_size: int, sym: bool, packing: str, dtype) -> None:
    ref, fast = _layers(LayerSpec(bits=bits, group_size=group_size, sym=sym), packing, dtype)
    dense_from = fast.dense_min_rows
    assert dense_from == DENSE_MIN_ROWS
    x = torch.randn(2, dense_from, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        expected = ref(x)
        for rows in (1, 3, dense_from):  # the kernel for a few rows, the dense path from dense_from
            got = fast(x[:, :rows])
            assert got.shape == expected[:, :rows].shape and got.dtype == dtype
            tol = TOL[dtype] if rows < dense_from else max(TOL[dtype], 1e-2)  # dense path: a bf16 matmul
            assert rel_err(got, expected[:, :rows]) <= tol, rows


@pytest.mark.parametrize(("out_features", "in_features", "group_size"), [(16, 64, 16), (200, 96, 32), (64, 1536, 512)])
@pytest.mark.parametrize("bits", [4, 8])
def test_odd_shapes_tail_rows_and_groups(out_features: int, in_features: int, group_size: int, bits: int) -> None:
    """Rows that leave a partial block, groups of 16, groups wider than the kernel's loop."""
    packing = "awq_gemm" if bits == 4 else "pack-quantized"  # layouts that hold any row count
    ref, fast = _layers(LayerSpec(bits=bits, group_size=group_size, sym=bits == 8), packing, torch.float32,
                        out_features, in_features)  # fmt: skip
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) <= TOL[torch.float32]


@pytest.mark.parametrize("bits", [4, 8])
def test_only_the_kernels_tables_stay_resident_and_saving_is_exact(bits: int) -> None:
    ref, fast = _layers(LayerSpec(bits=bits, group_size=32, sym=True), "auto_round", torch.float16, 128, 256)
    assert fast.qweight is None and fast.qzeros is None and fast.scales is None
    assert fast.native_zeros is None  # symmetric: one zero point for the layer
    assert fast.native_scales.dtype == torch.float16  # the checkpoint's own scales, not a converted copy
    resident = sum(b.numel() * b.element_size() for name, b in fast.named_buffers() if name != "bias")
    assert resident == 128 * 256 * bits // 8 + 128 * (256 // 32) * 2  # the codes + fp16 scales, nothing else
    if bits == 4:
        assert resident / (128 * 256 * 2) < 0.3  # the bound, as a fraction of fp16 bytes
    state = fast.state_dict()
    assert set(state) == set(ref.state_dict()) and all(torch.equal(state[k], v) for k, v in ref.state_dict().items())


def test_asymmetric_zero_points_and_non_fp16_scales_round_trip_exactly() -> None:
    """Every packer stores fp16 scales; a QuantizedTensor with bf16 ones (the table then holds float32) is repacked
    directly, computes ``(q - zero) * scale`` and reads back bit for bit."""
    g = torch.Generator().manual_seed(3)
    qt = quantize(torch.randn(OUT, IN, generator=g) * 0.05 + 0.02, LayerSpec(bits=4, group_size=64, sym=False))
    fast = NativeQuantLinear.from_quantized(qt, "auto_round", None, torch.float32)
    qt = type(qt)(qt.codes, qt.scales.bfloat16(), qt.zeros, qt.spec)
    fast.repack(qt)
    assert fast.native_zeros is not None and fast.native_scales.dtype == torch.float32
    back = fast.quantized_tensor()
    assert torch.equal(back.codes.int(), qt.codes.int()) and torch.equal(back.zeros.int(), qt.zeros.int())
    assert back.scales.dtype == torch.bfloat16 and torch.equal(back.scales, qt.scales)
    x = torch.randn(2, IN, generator=g)
    with torch.no_grad():
        assert rel_err(fast(x), x @ dequantize(qt).float().t()) <= TOL[torch.float32]


def test_copies_and_dtype_casts_keep_computing_on_their_own_buffers() -> None:
    """The layer caches its buffers' addresses for the decode path: a deepcopy, a pickle round trip and
    ``.to(dtype)`` must each compute with their own, valid buffers."""
    ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=False), "auto_round", torch.float32)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(x)
        fast_args = fast._layer_ptr
        clone = copy.deepcopy(fast)
        restored = pickle.loads(pickle.dumps(fast))
        del fast  # the copies must not read the original's (now freed) memory
        for layer in (clone, restored):
            assert layer.native_codes.data_ptr() == int(layer.layer_args[3]) and layer._layer_ptr != fast_args
            assert rel_err(layer(x), expected) <= TOL[torch.float32]
        clone.to(torch.bfloat16)
        assert clone.native_scales.dtype == torch.float16  # quantization state keeps its dtype
        assert rel_err(clone(x.bfloat16()), expected) <= TOL[torch.bfloat16]


def test_unaligned_and_strided_inputs() -> None:
    ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=True), "auto_round", torch.bfloat16)
    backing = torch.randn(2 * IN + 3, generator=torch.Generator().manual_seed(5)).bfloat16()
    unaligned = backing[3 : 3 + IN].view(1, IN)
    strided = backing[: 2 * IN].view(IN, 2)[:, 0].view(1, IN)  # every other value: not contiguous
    with torch.no_grad():
        for x in (unaligned, strided):
            assert rel_err(fast(x), ref(x.contiguous())) <= TOL[torch.bfloat16]
        x64 = torch.randn(1, IN, dtype=torch.float64)  # a dtype the kernel does not read: computed in float32
        assert fast(x64).dtype == torch.float64


def test_matches_torch_reference_on_a_stories260k_layer(stories_q_proj) -> None:
    """A trained layer (real weight statistics), with inputs of the scale the model feeds it."""
    weight, x = stories_q_proj
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    ref, fast = reference_and_kernel(
        NativeQuantLinear, spec, "auto_round", torch.float32, *weight.shape, 0, weight, with_bias=False
    )
    with torch.no_grad():
        expected = ref(x)
        for rows in (1, 8, x.shape[1]):  # the kernel, then (48 rows) the dense path
            tol = TOL[torch.float32] if rows < DENSE_MIN_ROWS else 1e-2
            assert rel_err(fast(x[:, :rows]), expected[:, :rows]) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_the_portable_build_without_avx512_gives_the_same_results(dtype, bits: int) -> None:
    """The plain-C loop (CPUs without AVX-512), built here with ``-march=x86-64-v2`` and without the compiler's
    ``_Float16`` (so the hand-written fp16 conversions run too), against the torch reference."""
    if cbuild.platform.machine() != "x86_64":
        pytest.skip("the portable build is checked on x86-64 (where the native build takes the AVX-512 path)")
    portable = load_kernel(march="x86-64-v2", defines=("-U__FLT16_MAX__",))
    assert portable.signround_wq_simd() == 0
    packing = "awq_gemm" if bits == 4 else "pack-quantized"
    ref, fast = _layers(LayerSpec(bits=bits, group_size=32, sym=bits == 8), packing, dtype, 200, 96)
    x = (torch.randn(3, 96, generator=torch.Generator().manual_seed(6)) * 4).to(dtype)
    x[0, :4] = torch.tensor([1e-6, -3e-7, 6e-8, 0.0])  # fp16 subnormals on the way in
    y = torch.empty(3, 200, dtype=dtype)
    assert portable.signround_wq_gemm(x.data_ptr(), {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype],
                                        3, fast._layer_ptr, y.data_ptr()) == 0  # fmt: skip
    with torch.no_grad():
        expected = ref(x) - ref.bias.to(dtype)
        assert rel_err(y, expected) <= TOL[dtype]
        if dtype != torch.float32:  # and the AVX-512 build with the compiler's conversions
            assert rel_err(y, fast.kernel_forward(x)) <= TOL[dtype]


def test_selection_prefers_it_on_cpu_and_names_why_not_elsewhere() -> None:
    w4 = LayerSpec(bits=4, group_size=32, sym=True)
    assert select(w4, "auto_round", "cpu", torch.float32, 576, 1536).name == "native"
    assert select(LayerSpec(bits=4, group_size=16), "pack-quantized", "cpu", torch.bfloat16, 64, 200).name == (
        "native"  # groups of 16 and any row count: what torch_int4 cannot take
    )
    reasons = {b.name: r for b, r in candidates(w4, "auto_round", "cuda", torch.float16, 576, 1536)}
    assert reasons["native"] == "device 'cuda' not in ['cpu']"
    w8_asym = LayerSpec(bits=8, group_size=32, sym=False)  # torch_int8 takes symmetric layers only
    assert select(w8_asym, "auto_round", "cpu", torch.float32, 576, 1536).name == "native"
    reasons = {b.name: r for b, r in candidates(LayerSpec(bits=4, group_size=9, sym=True), "pack-quantized", "cpu",
                                                torch.float32, 576, 1536)}  # fmt: skip
    assert reasons["native"] == "group of 9 input features is odd (the kernel reads inputs in pairs)"


def test_build_is_cached_and_failures_name_the_compiler(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path))
    cbuild.build_library(SOURCE)
    built = list((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob("tmp*"))  # no temporary left behind
    mtime = built[0].stat().st_mtime_ns
    cbuild.build_library(SOURCE)
    assert built[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    monkeypatch.setenv("CC", "signround-no-such-compiler")
    with pytest.raises(cbuild.BuildError, match=r"no C compiler found.*signround-no-such-compiler"):
        cbuild.build_library(SOURCE)
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return }\n")
    monkeypatch.delenv("CC")
    with pytest.raises(cbuild.BuildError, match=r"compiling broken\.c failed"):
        cbuild.build_library(broken)
    assert not list((tmp_path / "kernels").glob("broken*")) and not list((tmp_path / "kernels").glob("tmp*"))
    with pytest.raises(cbuild.BuildError, match=r"kernel source .*missing\.c cannot be read"):
        cbuild.build_library(tmp_path / "missing.c")
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # the cache root is a file: nothing can be written under it
    monkeypatch.setenv("SIGNROUND_CACHE", str(blocked))
    with pytest.raises(cbuild.BuildError, match=r"cannot write the kernel cache .*set SIGNROUND_CACHE"):
        cbuild.build_library(SOURCE)


def test_block_layout_constant_matches_the_c_source() -> None:
    assert f"#define BLOCK {BLOCK_ROWS}" in SOURCE.read_text()


@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16])
def test_dense_weight_from_c_equals_the_reference_dequantization(dense_dtype) -> None:
    """The C dequantizer behind the dense path gives the base class's weight bit for bit: float32 products of
    the exact values, rounded once."""
    for packing, sym in (("pack-quantized", True), ("awq_gemm", False)):  # 200 rows: a partial block
        _ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=sym), packing, torch.float32, 200, 96)
        fast.dense_dtype = dense_dtype
        expected = super(NativeQuantLinear, fast).dense_weight()
        got = fast.dense_weight()
        assert got.dtype == dense_dtype and torch.equal(got, expected)


@pytest.mark.skipif(not cbuild.Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_the_kernel_shares_torchs_openmp_runtime() -> None:
    """A second OpenMP runtime would start its own thread pool next to torch's and fight it for the cores."""
    maps = cbuild.Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_without_a_compiler_the_backend_steps_aside_with_the_reason(monkeypatch) -> None:
    from signround.kernels import native

    monkeypatch.setenv("CC", "signround-no-such-compiler")
    native._library.cache_clear()
    native.kernel_problem.cache_clear()
    try:
        w4 = LayerSpec(bits=4, group_size=32, sym=True)
        reasons = {b.name: r for b, r in candidates(w4, "auto_round", "cpu", torch.float32, 576, 1536)}
        assert reasons["native"].startswith("native kernel unavailable: no C compiler found")
        assert select(w4, "auto_round", "cpu", torch.float32, 576, 1536).name == "torch_int4"
    finally:
        monkeypatch.delenv("CC")
        native._library.cache_clear()
        native.kernel_problem.cache_clear()
    assert native.kernel_problem() is None


def test_a_layer_or_input_off_the_cpu_is_refused_not_read() -> None:
    """The C code reads host memory: a device pointer would crash the process, so it is never passed."""
    _ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=True), "auto_round", torch.float32)
    with pytest.raises(RuntimeError, match="native runs on CPU only, got meta"):
        fast(torch.empty(1, IN, device="meta"))
    fast.to("meta")  # stands in for a GPU: the tables leave host memory
    with pytest.raises(RuntimeError, match="native runs on CPU only, got meta"):
        fast(torch.randn(1, IN))
