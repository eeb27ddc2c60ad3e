"""Tunable GGUF grids (signround.quant.gguf_tunable) against llama.cpp's own two stages in signround.quant.gguf.

The oracle is ``quantize`` (llama.cpp's reference quantizer, byte-exact, see test_quant_gguf.py) for the start and
``quantize_with_scales`` + ``dequantize`` for tuned parameters: the fake quantizer must give their codes and values
bit for bit (float32 values compared as bits, so signed zeros count).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from signround.quant.gguf import GGUF_TYPES, GGUFQuantized, dequantize, quantize, quantize_with_scales, search_scales
from signround.quant.gguf import to_bytes as gguf_bytes
from signround.quant.gguf_tunable import (
    gguf_fake_quant,
    gguf_grid,
    gguf_scale_and_zero,
    search_range,
    to_gguf,
)
from signround.quant.int import _GroupQDQ

ALL = tuple(GGUF_TYPES)
CASES = ("gauss", "heavy", "mixed")
SHAPE = (8, 512)


def _weights(case: str, seed: int = 0, shape: tuple[int, int] = SHAPE) -> torch.Tensor:
    """gauss; heavy: Student t with 2 degrees of freedom (outliers tens of sigmas out); mixed: every 16 weights
    gaussian, zero, constant, one-signed, sparse, tiny or large, so that sub-blocks are flat, stored steps round
    to 0 and q6_k meets all-zero super-blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if case == "heavy":
        w = w / torch.sqrt(-torch.log(torch.rand(shape, generator=g)))  # z / sqrt(chi2_2 / 2)
    elif case == "mixed":
        subs = w.reshape(-1, 16)
        kind = torch.randint(0, 7, (subs.shape[0],), generator=g)
        sparse = torch.where(torch.rand(subs.shape, generator=g) < 0.75, 0.0, subs)
        options = torch.stack([subs, 0 * subs, torch.full_like(subs, -0.5), subs.abs(), sparse, subs * 1e-4, subs * 50])
        w = options[kind, torch.arange(subs.shape[0])].reshape(shape)
    return w


def _tuned(lo: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``alpha``, ``beta`` in [0.5, 1] per group and ``v`` in [-0.5, 0.5] per weight."""
    g = torch.Generator().manual_seed(seed)
    alpha = 0.5 + 0.5 * torch.rand(lo.shape, generator=g)
    beta = 0.5 + 0.5 * torch.rand(lo.shape, generator=g)
    return alpha, beta, torch.rand(SHAPE, generator=g) - 0.5


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


def _assert_same(a: GGUFQuantized, b: GGUFQuantized) -> None:
    """Field by field, fp16 compared as bits."""
    for field in ("codes", "d", "m", "dmin", "scales", "mins"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            as_bits = (lambda t: t.view(torch.int16)) if x.dtype == torch.float16 else (lambda t: t)
            assert x.dtype == y.dtype and torch.equal(as_bits(x), as_bits(y)), field


def _step(q: GGUFQuantized) -> torch.Tensor:
    """The stored step of every weight, ``[rows, cols]``."""
    t = q.type
    d = q.d.float().unsqueeze(-1)
    step = d * q.scales.float() if t.is_k_quant else d
    return step.repeat_interleave(t.sub_block, -1).reshape(q.shape)


# -- the start is llama.cpp's own quantizer ----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ALL)
def test_start_is_llama_cpp_rtn(name: str, case: str) -> None:
    """``alpha = beta = 1``, ``v = 0``: the stored blocks are ``quantize``'s byte for byte (with the search's codes,
    which llama.cpp keeps where a step is 0), and the fake quantizer's values are ``dequantize``'s, bit for bit
    against the same blocks without those codes (with them: equal values, signed zeros aside)."""
    w = _weights(case, seed=ALL.index(name))
    lo, hi = search_range(w, name)
    assert lo.dtype == hi.dtype == torch.float64 and lo.shape == (SHAPE[0], SHAPE[1] // GGUF_TYPES[name].sub_block)
    assert torch.all(lo <= hi)
    reference = quantize(w, name)
    started = to_gguf(w, name, lo, hi, codes=search_scales(w, name).codes)
    _assert_same(started, reference)
    np.testing.assert_array_equal(gguf_bytes(started), gguf_bytes(reference))
    without_codes = to_gguf(w, name, lo, hi)
    ones = torch.ones(lo.shape)
    for alpha in (None, ones):  # None and 1.0 are the same start
        w_hat, codes = gguf_fake_quant(w, name, lo, hi, alpha, alpha)
        assert torch.equal(codes, without_codes.codes)
        assert torch.equal(_bits(w_hat), _bits(dequantize(without_codes)))
        assert torch.equal(w_hat, dequantize(reference))
    live = _step(reference) != 0
    assert torch.equal(codes[live], reference.codes[live])


# -- tuned parameters: the fake quantizer is llama.cpp's second stage ---------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ALL)
def test_fake_quant_is_quantize_with_scales(name: str, case: str) -> None:
    """Random ``alpha`` / ``beta`` / ``v``: the codes and the dequantized values are exactly those of
    ``quantize_with_scales`` for the grid's float scales (and mins), which is what ``to_gguf`` stores."""
    w = _weights(case, seed=10 + ALL.index(name))
    lo, hi = search_range(w, name)
    alpha, beta, v = _tuned(lo, seed=ALL.index(name))
    grid = gguf_grid(lo, hi, name, alpha, beta)
    t = GGUF_TYPES[name]
    per_block = (SHAPE[0], SHAPE[1] // t.block_size, t.n_sub)
    mins = None if grid.mins is None else grid.mins.reshape(per_block)
    stored = quantize_with_scales(w, name, grid.scales.reshape(per_block), mins, v=v)
    _assert_same(to_gguf(w, name, lo, hi, alpha, beta, v), stored)
    w_hat, codes = gguf_fake_quant(w, name, lo, hi, alpha, beta, v)
    assert torch.equal(codes, stored.codes)
    assert torch.equal(_bits(w_hat), _bits(dequantize(stored)))
    assert not torch.equal(codes, quantize(w, name).codes)  # the tuned parameters did change something


@pytest.mark.parametrize("name", ALL)
def test_scale_and_zero_give_the_values(name: str) -> None:
    """``scale * (code - zero)`` is the dequantized weight (up to float rounding: the zero is a quotient), with an
    integer zero ``code_offset`` for the types without a min, a fractional one for those with."""
    w = _weights("gauss", seed=20)
    lo, hi = search_range(w, name)
    alpha, beta, v = _tuned(lo, seed=21)
    scale, zero = gguf_scale_and_zero(lo, hi, name, alpha, beta)
    assert scale.shape == zero.shape == lo.shape and scale.dtype == zero.dtype == torch.float32
    w_hat, codes = gguf_fake_quant(w, name, lo, hi, alpha, beta, v)
    t = GGUF_TYPES[name]
    expanded = (a.repeat_interleave(t.sub_block, -1) for a in (scale, zero))
    s, z = expanded
    torch.testing.assert_close(s * (codes.float() - z), w_hat, rtol=0, atol=1e-6 * float(w.abs().max()))
    if t.has_min:
        assert not torch.equal(zero, zero.round())
    else:
        assert torch.all(zero == t.code_offset)


@pytest.mark.parametrize("name", ["q3_k", "q6_k"])
def test_int_kernel_is_exact_for_symmetric_k_quants(name: str) -> None:
    """int.py's own fused kernel, unchanged, with ``gguf_scale_and_zero``'s (scale, zero), gives llama.cpp's codes
    and values bit for bit for q3_k / q6_k (no stored step is 0 here), and the same gradients as the GGUF kernel."""
    t = GGUF_TYPES[name]
    w = _weights("gauss", seed=30)
    lo, hi = search_range(w, name)
    a0, b0, v0 = _tuned(lo, seed=31)
    alpha, beta, v = (x.clone().requires_grad_() for x in (a0, b0, v0))
    scale, zero = gguf_scale_and_zero(lo, hi, name, alpha, beta)
    assert torch.all(scale != 0)
    wg = w.reshape(SHAPE[0], -1, t.sub_block)
    w_int, marked = _GroupQDQ.apply(wg, v.reshape(wg.shape), scale.unsqueeze(-1), zero.unsqueeze(-1), t.max_code,
                                    torch.float32)  # fmt: skip
    w_int = w_int.reshape(SHAPE)
    stored = to_gguf(w, name, lo, hi, a0, b0, v0)
    assert torch.equal(marked.clamp(0, t.max_code).reshape(SHAPE).to(torch.uint8), stored.codes)
    assert torch.equal(_bits(w_int), _bits(dequantize(stored)))
    probe = torch.randn(SHAPE, generator=torch.Generator().manual_seed(32))
    int_grads = torch.autograd.grad((w_int * probe).sum(), (alpha, beta, v))
    w_hat, _ = gguf_fake_quant(w, name, lo, hi, alpha, beta, v)
    for ours, theirs in zip(torch.autograd.grad((w_hat * probe).sum(), (alpha, beta, v)), int_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


# -- gradients -----------------------------------------------------------------------------------------------------
def _composed(w: torch.Tensor, name: str, lo, hi, alpha, beta, v) -> torch.Tensor:
    """The fake quantizer as plain autograd ops: the code's rounding straight-through, the clamp stopping the
    gradient outside the grid (int.py's convention), on the same grid numbers."""
    t = GGUF_TYPES[name]
    g = gguf_grid(lo, hi, name, alpha, beta)
    wg = w.reshape(SHAPE[0], -1, t.sub_block)
    code_scale, step = g.code_scale.unsqueeze(-1), g.step.unsqueeze(-1)
    x = wg if g.code_shift is None else wg + g.code_shift.unsqueeze(-1)
    u = (x / code_scale if t.is_k_quant else x * code_scale) + v.reshape(wg.shape) + t.code_offset
    if t.is_k_quant:
        rounded = torch.round(u)
    elif name == "q8_0":
        rounded = torch.where(u < t.code_offset, -1.0, 1.0) * torch.floor((u - t.code_offset).abs() + 0.5) + 128
    else:
        rounded = torch.floor(u + 0.5)  # C's trunc, once clamped
    code = (u + (rounded - u).detach()).clamp(0, t.max_code)
    value = step * (code - t.code_offset)
    return (value if g.shift is None else value - g.shift.unsqueeze(-1)).reshape(SHAPE)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_alpha_beta_and_v(name: str) -> None:
    """Gradients reach ``alpha``, ``beta`` and ``v``, finite everywhere, nonzero for many groups, and are those of
    the same straight-through estimator written as plain autograd ops."""
    w = _weights("gauss", seed=40)
    lo, hi = search_range(w, name)
    a0, b0, v0 = _tuned(lo, seed=41)
    probe = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42))
    grads = []
    for fn in (gguf_fake_quant, _composed):
        alpha, beta, v = (x.clone().requires_grad_() for x in (a0, b0, v0))
        out = fn(w, name, lo, hi, alpha, beta, v)
        w_hat = out[0] if isinstance(out, tuple) else out
        grads.append(torch.autograd.grad(((w_hat - w) * probe).square().sum(), (alpha, beta, v)))
    for grad in grads[0]:
        assert torch.isfinite(grad).all()
        # symmetric types: only the end that sets the scale gets a gradient, so ~half the groups for each
        assert (grad != 0).float().mean() > 0.2
    for ours, composed in zip(*grads, strict=True):
        torch.testing.assert_close(ours, composed, rtol=1e-4, atol=1e-5)


def test_ste_false_gives_the_same_values_without_gradients() -> None:
    w = _weights("gauss", seed=50)
    lo, hi = search_range(w, "q4_k")
    alpha = torch.full(lo.shape, 0.9, requires_grad=True)
    with_ste = gguf_scale_and_zero(lo, hi, "q4_k", alpha, alpha)
    without = gguf_scale_and_zero(lo, hi, "q4_k", alpha, alpha, ste=False)
    assert all(a.requires_grad and not b.requires_grad for a, b in zip(with_ste, without, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(with_ste, without, strict=True))


def test_bad_ranges_are_refused() -> None:
    lo, hi = search_range(_weights("gauss"), "q4_k")
    with pytest.raises(ValueError, match=r"multiple of 8"):
        gguf_grid(lo[:, :4], hi[:, :4], "q4_k")
    with pytest.raises(ValueError, match=r"\[rows, G\]"):
        gguf_scale_and_zero(lo, hi[:, :8], "q4_k")


# -- tunable, not only correct --------------------------------------------------------------------------------------
def _sign_descent(w: torch.Tensor, name: str, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    """``(RTN loss, best tuned loss)``: SignRound's update (sign of the gradient, linearly decaying step, ``alpha``
    / ``beta`` clamped to [0.5, 1], ``v`` to [-0.5, 0.5]) from llama.cpp's start; the best step is kept."""
    lo, hi = search_range(w, name)
    alpha, beta = torch.ones(lo.shape, requires_grad=True), torch.ones(lo.shape, requires_grad=True)
    v = torch.zeros(SHAPE, requires_grad=True)
    rtn = float(loss_fn(dequantize(quantize(w, name))))
    best = float("inf")
    for i in range(steps):
        loss = loss_fn(gguf_fake_quant(w, name, lo, hi, alpha, beta, v)[0])
        best = min(best, loss.item())
        loss.backward()
        with torch.no_grad():
            for p, bounds in ((alpha, (0.5, 1.0)), (beta, (0.5, 1.0)), (v, (-0.5, 0.5))):
                p -= lr * (1 - i / steps) * p.grad.sign()
                p.clamp_(*bounds)
                p.grad = None
    return rtn, best


@pytest.mark.parametrize("name", ["q4_k", "q3_k"])
def test_tuning_beats_llama_cpp_on_a_layer_output(name: str) -> None:
    """SignRound's objective, a layer's output error ``|(w_hat - w) x|^2`` on inputs with uneven channel scales
    (llama.cpp's search does not see them): 30 sign-gradient steps on ``alpha`` / ``beta`` / ``v`` cut it well
    below llama.cpp's."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(SHAPE, generator=g)
    x = torch.randn(64, SHAPE[1], generator=g) * torch.exp(torch.randn(SHAPE[1], generator=g))
    rtn, best = _sign_descent(w, name, lambda w_hat: ((w_hat - w) @ x.T).square().mean(), steps=30, lr=0.05)
    assert best < 0.8 * rtn


def test_tuning_beats_llama_cpp_on_q3_k_weight_error() -> None:
    """The plain weight error ``|w_hat - w|^2``: q3_k's search fits ``x^2``-weighted scales, so a few steps on
    ``alpha`` / ``beta`` find a grid that is better in plain MSE.  (q4_k's weighted least-squares scale *and* min
    are a local optimum of the plain error too: there the straight-through estimator's scale gradient, which
    always favours shrinking, does not beat it, hence the layer-output test above.)"""
    w = _weights("gauss", seed=2)
    rtn, best = _sign_descent(w, "q3_k", lambda w_hat: (w_hat - w).square().mean(), steps=10, lr=0.005)
    assert best < 0.995 * rtn
