"""Floating-point weight formats (signround.quant.fp): element grids, scales, exactness, gradients, and bit-for-bit
agreement with gguf-py's MXFP4 quantizer and compressed-tensors' NVFP4 / MX / FP8 compressors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from signround.quant import fp
from signround.quant.fp import E2M1, E4M3, E5M2

ELEMENTS = (E2M1, E4M3, E5M2)
FLOAT8 = {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _weight(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian rows whose magnitudes span four decades (so blocks get many different exponents)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]
    return w.to(dtype)


def _finite_codes(elem: fp.ElementFormat) -> torch.Tensor:
    codes = torch.arange(1 << elem.bits, dtype=torch.int32).to(torch.uint8)
    return codes[torch.isfinite(fp.from_codes(codes, elem))]


def _positive_grid(elem: fp.ElementFormat) -> torch.Tensor:
    values = fp.from_codes(_finite_codes(elem), elem)
    return values[values >= 0].unique()


# -- element grids ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("elem", ELEMENTS, ids=lambda e: e.name)
def test_every_code_round_trips(elem: fp.ElementFormat) -> None:
    """code -> value -> code for every finite code, -0 included (its sign bit survives)."""
    codes = _finite_codes(elem)
    assert len(codes) == {"e2m1": 16, "e4m3": 254, "e5m2": 248}[elem.name]
    assert torch.equal(fp.to_codes(fp.from_codes(codes, elem), elem), codes)


def test_e2m1_values() -> None:
    values = fp.from_codes(torch.arange(16, dtype=torch.int32).to(torch.uint8), E2M1)
    assert values.tolist() == E2M1_GRID + [-v for v in E2M1_GRID]
    assert torch.signbit(values[8])  # code 8 is -0


@pytest.mark.parametrize("elem", (E4M3, E5M2), ids=lambda e: e.name)
def test_float8_values_are_torchs(elem: fp.ElementFormat) -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    torch.testing.assert_close(
        fp.from_codes(codes, elem), codes.view(FLOAT8[elem]).float(), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("elem", (E4M3, E5M2), ids=lambda e: e.name)
def test_round_to_grid_is_torchs_cast(elem: fp.ElementFormat) -> None:
    """Round-to-nearest-even over the whole range (subnormals, every exact midpoint) is what torch's cast does."""
    g = torch.Generator().manual_seed(1)
    grid = _positive_grid(elem)
    midpoints = (grid[1:] + grid[:-1]) / 2
    magnitudes = torch.exp2(torch.empty(10000).uniform_(-20, math.log2(elem.max), generator=g))
    x = torch.cat([magnitudes, midpoints, grid, torch.nextafter(midpoints, torch.zeros(()))])
    x = torch.cat([x, -x]).clamp(-elem.max, elem.max)
    ours, torchs = fp.round_to_grid(x, elem), x.to(FLOAT8[elem]).float()
    assert torch.equal(ours, torchs)
    assert torch.equal(torch.signbit(ours), torch.signbit(torchs))
    assert torch.equal(fp.to_codes(ours, elem), x.to(FLOAT8[elem]).view(torch.uint8))


@pytest.mark.parametrize("elem", (E2M1, E4M3, E5M2), ids=lambda e: e.name)
def test_grid_step_is_two_to_the_binade_minus_mantissa_bits(elem: fp.ElementFormat) -> None:
    """The unit of ``v`` at every magnitude: ``2^(clamp(floor(log2 |x|), emin, emax) - mbits)``, 0 and subnormals at
    the subnormal spacing, beyond ``max`` the top binade's, either sign (checked against Python's exact frexp)."""
    g = torch.Generator().manual_seed(2)
    magnitudes = torch.exp2(torch.empty(20000).uniform_(elem.emin - 12, elem.emax + 4, generator=g))
    grid = _positive_grid(elem)
    x = torch.cat([magnitudes, grid, torch.nextafter(grid, torch.zeros(())), torch.zeros(1)])
    x = torch.cat([x, -x])
    expected = [
        math.ldexp(1.0, min(max(math.frexp(abs(v))[1] - 1 if v else elem.emin, elem.emin), elem.emax) - elem.mbits)
        for v in x.tolist()
    ]
    assert fp.grid_step(x, elem).tolist() == expected


def test_e2m1_rounding_ties_to_even_and_saturates() -> None:
    x = _t([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 7.0, 1e9, -0.25, -0.1, -1.75, -100.0])
    expected = _t([0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, -0.0, -2.0, -6.0])
    out = fp.round_to_grid(x, E2M1)
    assert torch.equal(out, expected)
    assert torch.signbit(out[-4]) and torch.signbit(out[-3])  # small negatives round to -0, as IEEE casts
    assert fp.to_codes(out, E2M1).tolist() == [0, 1, 2, 2, 4, 4, 6, 6, 7, 7, 7, 8, 8, 12, 15]


def test_e4m3_edge_cases() -> None:
    sub = 2.0**-9  # smallest subnormal; 2^-6 is the smallest normal
    x = _t([0.0, sub, 7 * sub, 2.0**-6, 448.0, 464.0, 465.0, 1e6, sub / 2, 3 * sub / 2, sub * 0.49, -448.5])
    expected = _t([0.0, sub, 7 * sub, 2.0**-6, 448.0, 448.0, 448.0, 448.0, 0.0, 2 * sub, 0.0, -448.0])
    assert torch.equal(fp.round_to_grid(x, E4M3), expected)
    codes = fp.to_codes(expected, E4M3).tolist()
    assert codes[:5] == [0x00, 0x01, 0x07, 0x08, 0x7E] and codes[-1] == 0xFE
    assert math.isnan(fp.from_codes(torch.tensor([0x7F], dtype=torch.uint8), E4M3).item())
    assert fp.grid_step(_t([0.0, sub, 1.0, 300.0, 1e4]), E4M3).tolist() == [sub, sub, 0.125, 32.0, 32.0]


def test_e8m0_scales() -> None:
    values = fp.e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8))
    assert values.tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    with pytest.raises(ValueError, match="255 is NaN"):
        fp.e8m0_to_float(torch.tensor([127, 255], dtype=torch.uint8))
    q = fp.quantize(_weight(2, 32), "mxfp4")
    q.scales[0, 0] = 255
    with pytest.raises(ValueError, match="255 is NaN"):
        fp.dequantize(q)


# -- scales ----------------------------------------------------------------------------------------------------------
def test_shared_exponent_rules() -> None:
    """OCP: floor(log2 amax) - emax_elem (may saturate); rceil: smallest 2^k with max_elem * 2^k >= amax."""
    amax = [6.0, 7.0, 3.0, 6.0001, 448.0, 449.0, 0.0]
    rows = []
    for a in amax:
        row = torch.zeros(32)
        row[5] = -a
        rows.append(row)
    w = torch.stack(rows)
    assert fp.quantize(w, "mxfp4").scales[:, 0].tolist() == [127, 127, 126, 127, 133, 133, 0]
    assert fp.quantize(w, "mxfp4_rceil").scales[:, 0].tolist() == [127, 128, 126, 128, 134, 134, 0]
    assert fp.quantize(w, "mxfp8").scales[:, 0].tolist() == [121, 121, 120, 121, 127, 127, 0]
    assert fp.quantize(w, "mxfp8_rceil").scales[:, 0].tolist() == [121, 121, 120, 121, 127, 128, 0]


@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_rceil_never_saturates_and_ocp_keeps_the_top_binade(name: str) -> None:
    w = _weight(64, 256, seed=2)
    elem = fp.fp_format(name).element
    amax = w.abs().reshape(64, 8, 32).amax(-1)
    ocp = amax / fp.block_scales(fp.quantize(w, name))
    rceil = amax / fp.block_scales(fp.quantize(w, name + "_rceil"))
    assert bool(((ocp >= 2.0**elem.emax) & (ocp < 2.0 ** (elem.emax + 1))).all())
    assert bool(((rceil <= elem.max) & (rceil > elem.max / 2)).all())


def test_nvfp4_global_scale() -> None:
    w = _weight(8, 64)
    q = fp.quantize(w, "nvfp4")
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == (1,)
    assert torch.equal(q.global_scale, (1 / w.abs().max()).reshape(1) * 2688.0)
    assert fp.nvfp4_global_scale(torch.zeros(3)).tolist() == [1.0]
    shared = fp.quantize(w, "nvfp4", global_scale=100.0)
    assert shared.global_scale.tolist() == [100.0]
    assert torch.equal(fp.fake_quant(w, "nvfp4", global_scale=100.0), fp.dequantize(shared))
    with pytest.raises(ValueError, match="global_scale"):
        fp.quantize(w, "nvfp4", global_scale=-1.0)
    with pytest.raises(ValueError, match="no global scale"):
        fp.quantize(w, "mxfp4", global_scale=1.0)


# -- API contracts ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fn", [fp.quantize, fp.fake_quant])
def test_nan_and_inf_are_refused(bad: float, fn) -> None:
    w = _weight(4, 32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="1 NaN or inf values"):
        fn(w, "mxfp4")


def test_format_registry_and_shapes() -> None:
    assert list(fp.FORMATS) == [
        "mxfp4", "mxfp4_rceil", "mxfp8", "mxfp8_rceil", "nvfp4", "fp8", "fp8_tensor", "fp8_block",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="accepted: mxfp4, mxfp4_rceil"):
        fp.fp_format("mxfp6")
    assert fp.fp_format("NVFP4") is fp.FORMATS["nvfp4"]
    with pytest.raises(ValueError, match="not a multiple of the block"):
        fp.quantize(_weight(4, 48), "mxfp4")
    with pytest.raises(ValueError, match="2-D"):
        fp.quantize(torch.ones(64), "nvfp4")
    shapes = {name: tuple(fp.quantize(_weight(129, 160), name).scales.shape) for name in fp.FORMATS}
    assert shapes == {
        "mxfp4": (129, 5), "mxfp4_rceil": (129, 5), "mxfp8": (129, 5), "mxfp8_rceil": (129, 5),
        "nvfp4": (129, 10), "fp8": (129, 1), "fp8_tensor": (1, 1), "fp8_block": (2, 2),
    }  # fmt: skip


def test_fp8_block_partial_edge_blocks() -> None:
    """129 x 100 is cut as if zero-padded to 256 x 128; each block's scale is its own amax / 448."""
    w = _weight(129, 100, seed=3)
    q = fp.quantize(w, "fp8_block")
    assert q.scales.shape == (2, 1) and q.codes.shape == (129, 100)
    assert torch.equal(q.scales[1, 0], w[128:].abs().max() / 448)
    assert torch.equal(fp.dequantize(q), fp.fake_quant(w, "fp8_block"))


def test_pack_fp4_nibble_order() -> None:
    codes = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    assert fp.pack_fp4(codes).tolist() == [[0x21, 0x8F]]
    assert torch.equal(fp.unpack_fp4(fp.pack_fp4(codes)), codes)


# -- exactness and gradients -----------------------------------------------------------------------------------------
def _tuning_params(name: str, w: torch.Tensor, seed: int = 5):
    q = fp.quantize(w, name)
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(w.shape, generator=g) - 0.5
    alpha = 0.7 + 0.3 * torch.rand(q.scales.shape, generator=g)
    beta = 0.7 + 0.3 * torch.rand(q.scales.shape, generator=g)
    return v, alpha, beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(fp.FORMATS))
def test_fake_quant_is_dequantize_of_quantize(name: str, dtype: torch.dtype) -> None:
    w = _weight(64, 256, seed=4, dtype=dtype)
    out = fp.fake_quant(w, name)
    assert out.dtype == dtype
    assert torch.equal(out, fp.dequantize(fp.quantize(w, name), dtype))
    ones = torch.ones(fp.quantize(w, name).scales.shape)
    assert torch.equal(fp.fake_quant(w, name, torch.zeros(w.shape), ones, ones), out)  # the neutral parameters
    v, alpha, beta = _tuning_params(name, w)
    tuned = fp.fake_quant(w, name, v, alpha, beta)
    assert torch.equal(tuned, fp.dequantize(fp.quantize(w, name, v, alpha, beta), dtype))
    assert not torch.equal(tuned, out)


@pytest.mark.parametrize("name", list(fp.FORMATS))
def test_gradients_reach_v_alpha_beta_and_w(name: str) -> None:
    w = _weight(64, 256, seed=6)
    v, alpha, beta = (t.requires_grad_() for t in _tuning_params(name, w))
    out = fp.fake_quant(w, name, v, alpha, beta)
    ((out - w) ** 2).sum().backward()
    for t in (v, alpha, beta):
        assert bool(torch.isfinite(t.grad).all())
    assert bool((v.grad != 0).any())
    assert bool(((alpha.grad != 0) | (beta.grad != 0)).all())  # each block's winning side (alpha: negative)
    if alpha.numel() >= 8:  # enough blocks for both sides to win somewhere
        assert bool((alpha.grad != 0).any()) and bool((beta.grad != 0).any())

    w = w.clone().requires_grad_()
    fp.fake_quant(w, name).sum().backward()
    assert (w.grad == 1).float().mean() > 0.9  # straight through, except saturated and block-extreme weights


def test_v_shifts_rounding_by_local_grid_steps() -> None:
    """One MXFP4 block with amax 6 (scale 1): +-0.5 moves an element half a step of its own binade."""
    w = torch.zeros(1, 32)
    w[0, :5] = _t([6.0, 1.2, 1.3, 4.9, 0.2])
    v = torch.zeros(1, 32)
    assert fp.fake_quant(w, "mxfp4", v)[0, :5].tolist() == [6.0, 1.0, 1.5, 4.0, 0.0]
    assert fp.fake_quant(w, "mxfp4", v + 0.5)[0, :5].tolist() == [6.0, 1.5, 1.5, 6.0, 0.5]
    assert fp.fake_quant(w, "mxfp4", v - 0.5)[0, :5].tolist() == [4.0, 1.0, 1.0, 4.0, 0.0]  # 6 - 1 = 5: tie, even
    w = _t([[448.0, 99.9]])  # fp8 per tensor, scale 1: 99.9 lies in the binade of step 8
    assert fp.fake_quant(w, "fp8_tensor", torch.tensor([[0.0, 0.5]])).tolist() == [[448.0, 104.0]]
    assert fp.fake_quant(w, "fp8_tensor").tolist() == [[448.0, 96.0]]


# -- interoperability ------------------------------------------------------------------------------------------------
def _mxfp4_test_weight() -> torch.Tensor:
    w = _weight(16, 512, seed=7)
    w[0, :32] = 0  # an all-zero block
    w[1, 32:64] = -1e-6  # a block of small negatives next to a large value: codes -0 ...
    w[1, 40] = 3.0
    return w


def test_mxfp4_bytes_equal_gguf() -> None:
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = _mxfp4_test_weight()
    q = fp.quantize(w, "mxfp4")
    halfway = (_positive_grid(E2M1)[1:] + _positive_grid(E2M1)[:-1]) / 2
    scaled = (w.reshape(16, 16, 32) / fp.block_scales(q)[..., None]).abs()
    assert not bool(torch.isin(scaled, halfway).any())  # exact ties round differently (next test)
    ours = fp.to_gguf_mxfp4(q)
    theirs = quants.quantize(w.numpy(), GGMLQuantizationType.MXFP4)
    assert ours.shape == theirs.shape == (16, 512 // 32 * 17)
    assert np.array_equal(ours, theirs)
    deq = quants.dequantize(ours, GGMLQuantizationType.MXFP4)
    assert np.array_equal(deq, fp.dequantize(q).numpy())
    assert torch.equal(fp.dequantize(fp.from_gguf_mxfp4(ours, (16, 512))), fp.dequantize(q))


def test_mxfp4_exact_ties_round_to_even_where_gguf_rounds_toward_zero() -> None:
    """A documented difference: llama.cpp keeps the first (smaller) of two equally near values."""
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    w = torch.zeros(1, 32)
    w[0, :5] = _t([6.0, 0.75, 1.75, 3.5, -2.5])
    ours = fp.dequantize(fp.quantize(w, "mxfp4"))[0, :5].tolist()
    theirs = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.MXFP4), GGMLQuantizationType.MXFP4)
    assert ours == [6.0, 1.0, 2.0, 4.0, -2.0]
    assert theirs[0, :5].tolist() == [6.0, 0.5, 1.5, 3.0, -2.0]


@pytest.fixture(scope="module")
def ct():
    """compressed-tensors' own functions (its import pulls in transformers: a few seconds, once)."""
    pytest.importorskip("compressed_tensors")
    import compressed_tensors.compressors as compressors
    import compressed_tensors.quantization as quantization
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

    return {
        "scheme": lambda name: quantization.preset_name_to_scheme(name, ["Linear"]),
        "calculate_qparams": calculate_qparams,
        "generate_gparam": generate_gparam,
        "generate_mx_scales": generate_mx_scales,
        "nvfp4": compressors.NVFP4PackedCompressor,
        "mxfp4": compressors.MXFP4PackedCompressor,
        "mxfp8": compressors.MXFP8QuantizationCompressor,
        "naive": compressors.NaiveQuantizationCompressor,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nvfp4_equals_compressed_tensors(ct, dtype: torch.dtype) -> None:
    """compressed-tensors' compressor, given the scales its own ``calculate_qparams`` / ``generate_gparam`` derive
    from the weight's float32 min / max, stores our global scale, e4m3 scales and packed codes byte for byte, and
    its decompression is our dequantize in bf16.  (Its observers passing bf16 min / max instead would round the
    global scale to bf16 first, e.g. 840 for 839.18: a different but equally valid quantization.)"""
    w = _mxfp4_test_weight().to(dtype)
    wf = w.float()
    scheme = ct["scheme"]("NVFP4A16")
    global_scale = ct["generate_gparam"](wf.min(), wf.max())
    groups = wf.reshape(16, -1, 16)
    scale, _ = ct["calculate_qparams"](groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=global_scale)
    state = {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}
    packed = ct["nvfp4"].compress(state, scheme)
    restored = ct["nvfp4"].decompress(packed, scheme)["weight"]

    q = fp.quantize(w, "nvfp4")
    assert torch.equal(q.global_scale, global_scale)
    assert torch.equal(q.scales.view(torch.uint8), packed["weight_scale"].view(torch.uint8))
    assert torch.equal(fp.pack_fp4(q.codes), packed["weight_packed"])
    assert restored.dtype == torch.bfloat16
    assert torch.equal(fp.dequantize(q, torch.bfloat16), restored)


def test_mx_scales_and_decompression_in_compressed_tensors(ct) -> None:
    """compressed-tensors reads our MXFP4 / MXFP8 tensors unchanged; its own scale rule is one exponent above OCP
    exactly when amax's mantissa is >= 1.75 (it rounds amax to one mantissa bit first)."""
    w = _mxfp4_test_weight()[1:]  # no all-zero block: its log2 would be -inf there
    amax = w.abs().reshape(15, 16, 32).amax(-1)
    mantissa = torch.frexp(amax)[0] * 2
    for name, bits in (("mxfp4", 4), ("mxfp8", 8)):
        ours = fp.quantize(w, name).scales.to(torch.int32)
        assert torch.equal(ct["generate_mx_scales"](amax, bits).to(torch.int32), ours + (mantissa >= 1.75).int())

    q = fp.quantize(w, "mxfp4")
    state = {"weight_packed": fp.pack_fp4(q.codes), "weight_scale": q.scales}
    out = ct["mxfp4"].decompress(state, ct["scheme"]("MXFP4A16"))["weight"]
    assert torch.equal(out, fp.dequantize(q, torch.bfloat16))
    q = fp.quantize(w, "mxfp8")
    state = {"weight": q.codes.view(torch.float8_e4m3fn), "weight_scale": q.scales}
    out = ct["mxfp8"].decompress(state, ct["scheme"]("MXFP8A16"))["weight"]
    assert torch.equal(out, fp.dequantize(q, torch.bfloat16))


@pytest.mark.parametrize(
    ("name", "preset"), [("fp8", "FP8_DYNAMIC"), ("fp8_tensor", "FP8"), ("fp8_block", "FP8_BLOCK")]
)
def test_fp8_codes_equal_compressed_tensors(ct, name: str, preset: str) -> None:
    """compressed-tensors' FP8 compressor, given float32 scales from its ``calculate_qparams``, stores our codes."""
    w = _weight(129, 100, seed=8)
    scheme = ct["scheme"](preset)
    rows, cols = {"fp8": (1, 100), "fp8_tensor": (129, 100), "fp8_block": (128, 128)}[name]
    padded = torch.nn.functional.pad(w, (0, -100 % cols, 0, -129 % rows))  # zero padding leaves min / max alone
    blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale, _ = ct["calculate_qparams"](blocks.amin((1, 3)), blocks.amax((1, 3)), scheme.weights)
    stored = ct["naive"].compress({"weight": w, "weight_scale": scale}, scheme)
    q = fp.quantize(w, name)
    assert torch.equal(q.scales.reshape(scale.shape), scale)
    assert torch.equal(q.codes, stored["weight"].view(torch.uint8))
