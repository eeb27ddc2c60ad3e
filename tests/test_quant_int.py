"""Integer quantization arithmetic (signround.quant.int): hand-worked examples, exactness and gradients."""

from __future__ import annotations

import pytest
import torch

from signround.quant.int import GroupedWeight, dequantize, fake_quant, group_view, quantize
from signround.schemes import LayerSpec

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- hand-computed examples ------------------------------------------------------------------------------------------
def test_sym_full_range_hand_example() -> None:
    """4-bit full-range symmetric, one group of 4 per row; every number below is worked out by hand.

    Row 0 [-1, 0.5, 2, -0.3]: the positive side wins (|2| > |-1|), so max_v = -2 and scale = -2/8 = -0.25
    (negative): 2 -> 2/-0.25 = -8 -> code -8+8 = 0; -1 -> 4 -> 12; 0.5 -> -2 -> 6; -0.3 -> 1.2 -> 1 -> 9.
    Row 1 [0.5, -3, 1, 0.2]: the negative side wins, scale = 3/8 = 0.375 (positive): -3 -> -8 -> 0;
    0.5 -> 1.33 -> 1 -> 9; 1 -> 2.67 -> 3 -> 11; 0.2 -> 0.53 -> 1 -> 9.
    """
    spec = LayerSpec(bits=4, group_size=4, sym=True)
    w = _t([[-1.0, 0.5, 2.0, -0.3], [0.5, -3.0, 1.0, 0.2]])
    qt = quantize(w, spec)
    assert qt.codes.dtype == torch.uint8 and qt.zeros.dtype == torch.int32 and qt.scales.dtype == torch.float16
    assert qt.codes.tolist() == [[12, 6, 0, 9], [9, 0, 11, 9]]
    assert qt.scales.float().tolist() == [[-0.25], [0.375]]
    assert qt.zeros.tolist() == [[8], [8]]  # fixed zero point 2^(b-1)
    expected = _t([[-1.0, 0.5, 2.0, -0.25], [0.375, -3.0, 1.125, 0.375]])
    assert torch.equal(dequantize(qt), expected)
    assert torch.equal(fake_quant(w, spec), expected)


def test_sym_two_bit_and_tie_hand_example() -> None:
    """2-bit: [1, -0.5, 0.3, 0]: scale = -1/2 = -0.5; codes 1 -> -2+2 = 0, -0.5 -> 1+2 = 3, 0.3 -> -0.6 -> -1+2 = 1,
    0 -> 2.  Tie |min| == |max| ([-2, 2, 1, 0] at 4 bits): the positive side is used (scale -2/8, as the reference
    does), so -2 -> 8+8 = 16, clamped to 15 -> dequantized -1.75."""
    qt = quantize(_t([[1.0, -0.5, 0.3, 0.0]]), LayerSpec(bits=2, group_size=4))
    assert qt.codes.tolist() == [[0, 3, 1, 2]]
    assert qt.zeros.tolist() == [[2]]
    assert torch.equal(dequantize(qt), _t([[1.0, -0.5, 0.5, 0.0]]))

    qt = quantize(_t([[-2.0, 2.0, 1.0, 0.0]]), LayerSpec(bits=4, group_size=4))
    assert qt.scales.float().tolist() == [[-0.25]]
    assert qt.codes.tolist() == [[15, 0, 4, 8]]
    assert torch.equal(dequantize(qt), _t([[-1.75, 2.0, 1.0, 0.0]]))


def test_asym_hand_example() -> None:
    """Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), range widened to include 0.

    4-bit [-1.5, 0, 3, 6]: scale 7.5/15 = 0.5, zero round(3) = 3, codes -3+3 = 0, 3, 6+3 = 9, 12+3 = 15.
    2-bit [0.4, 1, 1.6, 3]: min widened to 0, scale 3/3 = 1, zero 0, codes 0, 1, 2, 3 -> dequantized 0, 1, 2, 3.
    2-bit [-1, 0, 0.6, 2]: scale 1, zero 1, codes 0, 1, 2, 3.
    """
    qt = quantize(_t([[-1.5, 0.0, 3.0, 6.0]]), LayerSpec(bits=4, group_size=4, sym=False))
    assert (qt.codes.tolist(), qt.scales.float().tolist(), qt.zeros.tolist()) == ([[0, 3, 9, 15]], [[0.5]], [[3]])
    assert torch.equal(dequantize(qt), _t([[-1.5, 0.0, 3.0, 6.0]]))

    spec2 = LayerSpec(bits=2, group_size=4, sym=False)
    qt = quantize(_t([[0.4, 1.0, 1.6, 3.0], [-1.0, 0.0, 0.6, 2.0]]), spec2)
    assert qt.codes.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert qt.zeros.tolist() == [[0], [1]]
    assert qt.scales.float().tolist() == [[1.0], [1.0]]
    assert torch.equal(dequantize(qt), _t([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 2.0]]))


def test_clipping_and_rounding_offset_hand_example() -> None:
    """beta = 0.5 halves wmax: [-1, 0.5, 2, -0.3] -> range [-1, 1] (a tie) -> scale -1/8 = -0.125:
    -1 -> 8+8 = 16 -> 15 (-0.875); 0.5 -> -4+8 = 4 (0.5); 2 -> -16+8 -> 0 (1.0); -0.3 -> 2.4 -> 2+8 = 10 (-0.25).
    Asym alpha = beta = 0.5 on [-1.5, 0, 3, 6]: range [-0.75, 3], scale 0.25, zero 3: codes 0 (clamped), 3, 15, 15.
    v = +0.4 on -0.3 (no clipping, scale -0.25): 1.2 + 0.4 = 1.6 -> 2 -> code 10 -> -0.5."""
    sym = LayerSpec(bits=4, group_size=4, sym=True)
    w = _t([[-1.0, 0.5, 2.0, -0.3]])
    one, half = torch.ones(1, 1), torch.full((1, 1), 0.5)
    qt = quantize(w, sym, alpha=one, beta=half)
    assert qt.codes.tolist() == [[15, 4, 0, 10]]
    expected = _t([[-0.875, 0.5, 1.0, -0.25]])
    assert torch.equal(dequantize(qt), expected)
    assert torch.equal(fake_quant(w, sym, alpha=one, beta=half), expected)

    asym = LayerSpec(bits=4, group_size=4, sym=False)
    qt = quantize(_t([[-1.5, 0.0, 3.0, 6.0]]), asym, alpha=half, beta=half)
    assert (qt.codes.tolist(), qt.zeros.tolist(), qt.scales.float().tolist()) == ([[0, 3, 15, 15]], [[3]], [[0.25]])
    assert torch.equal(dequantize(qt), _t([[-0.75, 0.0, 3.0, 3.0]]))

    v = _t([[0.0, 0.0, 0.0, 0.4]])
    qt = quantize(w, sym, v=v)
    assert qt.codes.tolist() == [[12, 6, 0, 10]]
    assert torch.equal(dequantize(qt), _t([[-1.0, 0.5, 2.0, -0.5]]))
    assert torch.equal(fake_quant(w, sym, v=v), dequantize(qt))


def test_group_size_not_dividing_raises() -> None:
    with pytest.raises(ValueError, match=r"in_features=96 is not divisible by group_size=64"):
        quantize(torch.randn(4, 96), LayerSpec(bits=4, group_size=64))
    assert group_view(torch.randn(4, 96), -1).shape == (4, 1, 96)


# -- exactness over bits and group sizes -----------------------------------------------------------------------------
def _random_case(bits: int, group_size: int, sym: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 256, generator=gen) * 0.05
    w[0, :5] *= 20  # outliers so clipping matters
    groups = 256 // (256 if group_size == -1 else group_size)
    v = torch.rand(16, 256, generator=gen) - 0.5
    alpha = 0.5 + 0.5 * torch.rand(16, groups, generator=gen)
    beta = 0.5 + 0.5 * torch.rand(16, groups, generator=gen)
    return LayerSpec(bits=bits, group_size=group_size, sym=sym), w, v, alpha, beta


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_quantize_equals_fake_quant_exactly(bits: int, group_size: int, sym: bool) -> None:
    spec, w, v, alpha, beta = _random_case(bits, group_size, sym)
    qt = quantize(w, spec, v, alpha, beta)
    groups = 256 // (256 if group_size == -1 else group_size)
    assert qt.codes.shape == (16, 256) and qt.scales.shape == (16, groups) and qt.zeros.shape == (16, groups)
    assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) <= 2**bits - 1
    # the whole code range is used somewhere (full-range sym reaches code 0 and, with v, the top code)
    assert int(qt.codes.min()) == 0
    assert torch.equal(dequantize(qt), fake_quant(w, spec, v, alpha, beta))
    # and without the tuned parameters (plain RTN)
    assert torch.equal(dequantize(quantize(w, spec)), fake_quant(w, spec))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_error_bounded_by_step_and_shrinks_with_bits(group_size: int, sym: bool) -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    errors = []
    for bits in BITS:
        spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
        qt = quantize(w, spec)
        err = (dequantize(qt) - w).abs()
        step = qt.scales.float().abs().repeat_interleave(256 // qt.scales.shape[1], dim=1)
        assert bool((err <= step * 1.0001).all()), f"bits={bits}: an error exceeds one quantization step"
        errors.append(err.square().mean().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 100


def test_scales_are_float16_representable_and_fake_quant_uses_them() -> None:
    """The fake quantizer rounds scales to fp16 too: its output is a multiple of the stored fp16 scale."""
    spec, w, _v, _a, _b = _random_case(3, 32, True, seed=3)
    qt = quantize(w, spec)
    fq = fake_quant(w, spec)
    multiples = fq.reshape(16, -1, 32) / qt.scales.float().unsqueeze(-1)
    assert torch.equal(multiples, multiples.round())


# -- gradients -------------------------------------------------------------------------------------------------------
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _reference_fake_quant(w, spec: LayerSpec, v, alpha, beta) -> torch.Tensor:
    """The module docstring's formulas written with plain autograd ops (the oracle for the gradients)."""
    out_f, in_f = w.shape
    gs = in_f if spec.group_size == -1 else spec.group_size
    wg = w.reshape(out_f, in_f // gs, gs)
    wmin = wg.amin(-1).clamp(max=0) * alpha
    wmax = wg.amax(-1).clamp(min=0) * beta
    maxq = 2**spec.bits - 1
    if spec.sym:
        half = 2 ** (spec.bits - 1)
        max_v = torch.where(-wmin > wmax, -wmin, -wmax)
        scale = max_v / half
        scale = torch.where(scale < 0, scale.clamp(max=-1e-5), scale.clamp(min=1e-5))
        scale = scale.to(torch.float16).to(torch.float32)
        zero = torch.full_like(scale, float(half))
    else:
        scale = ((wmax - wmin) / maxq).clamp(min=1e-5).to(torch.float16).to(torch.float32)
        zero = _round_ste(-wmin / scale).clamp(0, maxq)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    codes = (_round_ste(wg / scale + v.reshape(wg.shape)) + zero).clamp(0, maxq)
    return ((codes - zero) * scale).reshape(out_f, in_f)


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, True), (4, 64, False), (3, -1, True), (8, 32, False)])
def test_fake_quant_gradients_reach_v_alpha_beta(bits: int, group_size: int, sym: bool) -> None:
    spec, w, v0, a0, b0 = _random_case(bits, group_size, sym, seed=5)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(6)) * 0.05
    grads = []
    for fn in (fake_quant, _reference_fake_quant):
        v, alpha, beta = (t.clone().requires_grad_(True) for t in (v0, a0, b0))
        out = fn(w, spec, v, alpha, beta)
        ((out - target) ** 2).sum().backward()
        grads.append((out.detach(), v.grad, alpha.grad, beta.grad))
    (out, gv, ga, gb), (ref_out, rv, ra, rb) = grads
    assert torch.equal(out, ref_out)
    for name, g in (("v", gv), ("alpha", ga), ("beta", gb)):
        assert g is not None and bool(torch.isfinite(g).all()), name
        assert int((g != 0).sum()) > g.numel() // 4, f"gradient of {name} is mostly zero"
    torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-7)
    # The per-group scale gradient is a difference of two group sums; summation order differs from the
    # composed ops, so compare against the gradient's own magnitude.
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-4 * float(ra.abs().max()))
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-4 * float(rb.abs().max()))


def test_fake_quant_keeps_dtype_and_shape() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    out = fake_quant(w, LayerSpec(bits=4, group_size=32))
    assert out.dtype == torch.bfloat16 and out.shape == w.shape


# -- what tuning keeps per weight ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, True), (3, -1, False), (4, 64, False), (8, 64, True)])
def test_fake_quant_codes_are_exactly_what_quantize_packs(bits: int, group_size: int, sym: bool, dtype) -> None:
    """Tuning keeps the minibatch winner as the codes its forward used: they must be the packed codes."""
    spec, w, v, alpha, beta = _random_case(bits, group_size, sym, seed=11)
    w = w.to(dtype)
    gw = GroupedWeight.of(w, group_size)
    qdq, rounded = gw.fake_quant(spec, v, alpha, beta, out_dtype=torch.float32)
    packed = rounded.quantized(torch.float16)
    expected = quantize(w, spec, v, alpha, beta)
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(packed, field), getattr(expected, field)), field
    assert torch.equal(qdq, dequantize(expected))
    # the clipped ends are marked outside [0, maxq], and there are some at these clip factors
    marked = rounded.marked_codes
    assert marked.element_size() == (1 if bits <= 6 else 2)
    assert int(marked.min()) == -1 or int(marked.max()) == 2**bits


def test_tuning_keeps_the_stored_weight_not_a_float32_copy() -> None:
    """A bf16 weight is used as stored (widening to float32 is exact, done on the fly): same values and
    gradients as the float32 copy, and the backward keeps that weight plus one byte per weight, nothing else."""
    spec, w, v0, a0, b0 = _random_case(4, 32, False, seed=12)
    w16 = w.to(torch.bfloat16)
    results = []
    for weight in (w16, w16.float()):
        v, alpha, beta = (t.clone().requires_grad_(True) for t in (v0, a0, b0))
        gw = GroupedWeight.of(weight, 32)
        out, _codes = gw.fake_quant(spec, v, alpha, beta, out_dtype=torch.bfloat16)
        if weight.dtype == torch.bfloat16:
            assert gw.wg.data_ptr() == w16.data_ptr()
            qdq_node = out.grad_fn.next_functions[0][0]  # under the reshape
            full = [t for t in qdq_node.saved_tensors if t.numel() == w.numel()]
            assert sorted(t.element_size() for t in full) == [1, 2]  # the bf16 weight and the one-byte codes
        (out.float() ** 2).sum().backward()
        results.append((out, v.grad, alpha.grad, beta.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(7, 96), (3, 11)])
def test_kept_codes_give_exactly_the_quantized_result_of_the_marked_codes(bits: int, shape: tuple[int, int]) -> None:
    """The tuning loop keeps its best step packed (KeptCodes): the packed result must equal the marked one's,
    also for clipped codes (marks -1 and 2^b) and a code count that does not fill the last byte."""
    torch.manual_seed(bits)
    w = torch.randn(*shape) * 3
    spec = LayerSpec(bits=bits, group_size=32 if shape[1] % 32 == 0 else -1, sym=False)
    gw = GroupedWeight.of(w, spec.group_size)
    v = torch.rand(w.shape) - 0.5
    alpha = torch.full(gw.wmin.shape, 0.6)  # a narrow range: many codes clipped on both ends
    _, rounded = gw.fake_quant(spec, v, alpha, alpha)
    marks = rounded.marked_codes
    assert bool((marks == -1).any()) and bool((marks == 2**bits).any())
    kept = rounded.kept()
    assert kept.packed.dtype == torch.uint8
    assert kept.packed.numel() == -(-w.numel() * {2: 2, 3: 4, 4: 4, 8: 8}[bits] // 8)
    expected, got = rounded.quantized(torch.float16), kept.quantized(torch.float16)
    assert torch.equal(got.codes, expected.codes)
    assert torch.equal(got.scales, expected.scales) and torch.equal(got.zeros, expected.zeros)
