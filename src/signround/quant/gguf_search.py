"""llama.cpp's reference GGUF quantizers, C-faithful, split into their two stages.

``llama-quantize`` without an importance matrix runs these (``quantize_q*`` with ``quant_weights == NULL`` calls
the ``*_ref`` functions of ``ggml-quants.c``):

* q4_0 / q4_1 / q5_0 / q5_1 / q8_0: ``quantize_row_q*_ref``: absmax (sign kept) or min/max scale in float32,
  codes by truncating ``x * (1 / d) + offset + 0.5`` (q8_0: ``roundf``) with the float32 ``d``, stored as fp16;
* q2_k: ``quantize_row_q2_K_ref`` with ``make_qkx2_quants`` (sub-blocks of 16, weights ``|x|``, absolute error);
* q3_k: ``quantize_row_q3_K_ref`` with ``make_q3_quants`` (coordinate descent, weights ``x^2``);
* q4_k / q5_k: ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` with ``make_qkx2_quants`` (sub-blocks of 32,
  weights ``rms(x) + |x|``, squared error);
* q6_k: ``quantize_row_q6_K_ref`` with ``make_qx_quants(rmse_type=1)``.

With an importance matrix row ``qw`` (``quant_weights != NULL``: ``quantize_row_*_impl``) every search is weighted
by ``search_weights`` (``qw * sqrtf(sigma2 + x^2)``, q6_k: ``qw``), and:

* q4_0 / q5_0: ``make_qx_quants`` (19 grids, weighted least-squares ``d``); q4_1 / q5_1: ``make_qkx3_quants``
  (37 grids, weighted least-squares ``d`` and min).  C stores the search's codes as they are, not recomputed from
  the fp16 ``d``; the search returns them and the store keeps them;
* q2_k / q4_k / q5_k: ``make_qkx3_quants`` per sub-block, then the sub-block scales and mins are stored by
  ``make_qp_quants`` weighted by each sub-block's summed weights ``sw`` (not by their maximum);
* q3_k: ``make_qx_quants`` per sub-block, the scales stored by ``make_qx_quants(32, sw)``;
* q6_k: ``make_qx_quants`` weighted by ``qw``, stored as without one;
* q8_0: ``quantize_q8_0`` ignores ``qw``.

Each is split where a tuner can step in: ``search_blocks`` is the first stage, the float scale (and min) of every
block or sub-block; ``store_blocks`` is the second, which for the K-quants quantizes those to the integer sub-block
scales against fp16 super-block scales, and then recomputes every code from the stored values.

Bit-exactness with the C code: everything is float32, one IEEE operation at a time in the C expression's order,
without fused multiply-adds (as ggml-base is built for x86-64; an FMA-contracting build, e.g. GCC on aarch64, can
differ in the last bit); sums over a sub-block are accumulated sequentially like the C loops; ``nearest_int`` uses
C's own ``+ 1.5 * 2^23`` trick (round half to even); ties for the largest magnitude (and ``-0.0`` vs ``0.0`` for a
min or max) go to the first element like the C loops' strict comparisons.  Two torch operations are not IEEE-exact
and are avoided: ``c / t`` for a Python number ``c`` (it is ``c * (1 / t)``) and float32 ``sqrt``.  Every block is
processed independently and identically, so the whole tensor is vectorised: Python loops run only over candidate
steps and positions inside a sub-block, never over blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .gguf_types import GROUP_MAX_EPS, Blocks, GGUFType

__all__ = ["WEIGHTED_STORE", "BlockScales", "search_blocks", "search_weights", "store_blocks"]


class BlockScales(NamedTuple):
    """``GGUFScales`` on ``N`` blocks: scales / mins float32 ``[N, n_sub]``, codes uint8 ``[N, block_size]``."""

    scales: torch.Tensor
    mins: torch.Tensor | None = None
    codes: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# float32 arithmetic as the C code does it


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` as one IEEE division (torch's ``c / t`` multiplies by the reciprocal)."""
    return torch.div(torch.tensor(c, dtype=torch.float32, device=t.device), t)


def _c_float(*terms: float) -> float:
    """A C float expression like ``rmin + 0.1f*is + nmax`` of constants, summed left to right in float32."""
    acc = np.float32(terms[0])
    for term in terms[1:]:
        acc = acc + np.float32(term)
    return float(acc)


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """C's ``nearest_int``, bit for bit: the low mantissa bits of ``v + 1.5 * 2^23``, i.e. ``v`` rounded half to
    even for ``|v| <= 2^22`` (the range C asserts) and C's same garbage beyond it (inf, NaN, overflowed scales)."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x7FFFFF).sub_(0x400000).float()


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 accumulated in order, like ``for (i = 0; i < n; ++i) s += t[i];`` in float32."""
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc


def _signed_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(largest |x|, the x that has it)`` along ``dim``; the first one on ties, like ``if (ax > amax)``."""
    val = x.gather(dim, x.abs().argmax(dim, keepdim=True)).squeeze(dim)
    return val.abs(), val


def _first_min_max(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` along ``dim`` as the C loops find them: the first of equal values (``-0.0`` vs ``0.0``)."""
    lo = x.gather(dim, x.argmin(dim, keepdim=True))
    hi = x.gather(dim, x.argmax(dim, keepdim=True))
    return lo.squeeze(dim), hi.squeeze(dim)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrtf``, correctly rounded: torch's vectorised float32 sqrt is not (off by an ulp now and then); the
    float64 root of a float32 value rounds to the correctly rounded float32 root."""
    return torch.sqrt(x.double()).float()


def _positive_max(x: torch.Tensor) -> torch.Tensor:
    """``max(0, max_j x[..., j])``: the C loop ``m = 0; if (x > m) m = x;``."""
    mx = x.amax(-1)
    return torch.where(mx > 0, mx, torch.zeros_like(mx))


def _wrap(v: torch.Tensor, signed: bool) -> torch.Tensor:
    """An integer-valued float stored into a C ``uint8_t`` / ``int8_t`` (modulo 256)."""
    v = v.remainder(256)
    return torch.where(v >= 128, v - 256, v) if signed else v


def _sub_major(x: torch.Tensor, sub: int) -> torch.Tensor:
    """Blocks ``[N, block]`` -> ``[sub, N * block // sub]``: one column per sub-block, so that a position inside the
    sub-blocks is one contiguous row (sequential sums and the coordinate descent step through positions)."""
    return x.reshape(-1, sub).T.contiguous()


def _block_codes(q: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``_sub_major`` for a search's integer-valued codes: uint8 ``[N, block]``."""
    return q.T.reshape(n, -1).to(torch.uint8)


def _with_offset(t: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """``t + v``, the tuner's rounding offset, before a code is rounded; ``t`` itself (not ``t + 0``) without one."""
    return t if v is None else t + v


# ----------------------------------------------------------------------------------------------------------------
# legacy types: quantize_row_q{4,5}_{0,1}_ref, quantize_row_q8_0_ref.  The codes use the float32 d, not the fp16 one.


def _search_legacy_sym(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    """q4_0 / q5_0: ``d = max / -offset`` with ``max`` the signed largest magnitude, so that it maps to code 0.
    With search weights (``quantize_row_q*_0_impl``): ``make_qx_quants``' weighted fit, and its codes, which C
    stores as they are."""
    if qw is not None:
        scale, q = _make_qx_quants(_sub_major(x, t.block_size), t.code_offset, _sub_major(qw, t.block_size))
        return BlockScales(scale.unsqueeze(-1), codes=_block_codes(q, x.shape[0]))
    _, mx = _signed_absmax(x, -1)
    return BlockScales((mx / -t.code_offset).unsqueeze(-1))


def _store_legacy_sym(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    """``d`` as fp16; codes from the float32 ``d`` (``*_ref``), or the importance path's search codes as given."""
    d = s.scales
    if s.codes is not None:
        return Blocks(s.codes, d.squeeze(-1).half())
    inv = torch.where(d == 0, torch.zeros_like(d), _rdiv(1.0, d))
    codes = (_with_offset(x * inv, v) + (t.code_offset + 0.5)).trunc().clamp(0, t.max_code)
    return Blocks(codes.to(torch.uint8), d.squeeze(-1).half())


def _search_legacy_min(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    """q4_1 / q5_1: ``d = (max - min) / (2^bits - 1)``; the min is returned negated (``GGUFScales``' sign).  With
    search weights (``quantize_row_q*_1_impl``): ``make_qkx3_quants``' weighted fit, and its codes (stored as
    they are)."""
    if qw is not None:
        xs, ws = _sub_major(x, t.block_size), _sub_major(qw, t.block_size)
        scale, the_min, q = _make_qkx2_quants(xs, ws, t.max_code, -0.9, 36, use_mad=False, rdelta=0.05)
        return BlockScales(scale.unsqueeze(-1), the_min.unsqueeze(-1), _block_codes(q, x.shape[0]))
    lo, hi = (v.unsqueeze(-1) for v in _first_min_max(x, -1))
    return BlockScales((hi - lo) / t.max_code, -lo)


def _store_legacy_min(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    """Codes from ``x - min`` (or the importance path's search codes as given), stored min ``m = min`` (negating
    twice is exact, signed zeros included)."""
    d, lo = s.scales, -s.mins
    if s.codes is not None:
        return Blocks(s.codes, d.squeeze(-1).half(), m=lo.squeeze(-1).half())
    inv = torch.where(d == 0, torch.zeros_like(d), _rdiv(1.0, d))
    codes = (_with_offset((x - lo) * inv, v) + 0.5).trunc().clamp(0, t.max_code)
    return Blocks(codes.to(torch.uint8), d.squeeze(-1).half(), m=lo.squeeze(-1).half())


def _search_q8_0(t: GGUFType, x: torch.Tensor, qw: None = None) -> BlockScales:
    """``d = amax / 127`` (``quantize_q8_0`` ignores an importance matrix)."""
    return BlockScales(x.abs().amax(-1, keepdim=True) / 127)


def _store_q8_0(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    """Codes ``roundf(x / d)`` (halves away from zero), stored as ``code + 128``.  C needs no clamp (``|x / d| <=
    127``); one keeps an offset ``v`` from wrapping 127.5 around to -128."""
    d = s.scales
    inv = torch.where(d == 0, torch.zeros_like(d), _rdiv(1.0, d))
    r = _with_offset(x * inv, v)
    a = r.abs()
    rounded = a.floor() + (a - a.floor() >= 0.5)
    codes = (torch.where(r < 0, -rounded, rounded) + t.code_offset).clamp(0, t.max_code)
    return Blocks(codes.to(torch.uint8), d.squeeze(-1).half())


# ----------------------------------------------------------------------------------------------------------------
# K-quant searches (ggml-quants.c), on sub-blocks laid out [positions, sub-blocks]


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, nstep: int, use_mad: bool, rdelta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants``: weighted least-squares scale and min over ``nstep + 1`` candidate grids ``(rmin +
    rdelta * is + nmax) / (max - min)``.  As in C, an accepted candidate's min also shifts the later candidates'
    grids.  ``make_qkx3_quants`` (the importance path, given weights) is the same computation with its own
    ``rmin`` / ``rdelta`` / ``nstep``.  Returns ``(scale [B], -min [B], codes [n, B])``."""
    mn, mx = _first_min_max(x, 0)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat, flat_min = mx == mn, mn  # C returns early for these, before any candidate
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)

    def codes(scale_numerator: float, lo: torch.Tensor) -> torch.Tensor:
        return _nearest_int(_rdiv(scale_numerator, mx - lo) * (x - lo)).clamp_(0, nmax)

    def error(scale: torch.Tensor, lo: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = scale * q + lo - x
        return _seq_sum(w * (diff.abs() if use_mad else diff * diff))

    iscale = _rdiv(float(nmax), mx - mn)
    scale = _rdiv(1.0, iscale)
    best_q = _nearest_int(iscale * (x - mn)).clamp_(0, nmax)
    best = error(scale, mn, best_q)
    for step in range(nstep + 1):
        q = codes(_c_float(rmin, np.float32(rdelta) * np.float32(step), nmax), mn)
        wq = w * q
        sum_l, sum_l2, sum_xl = _seq_sum(wq), _seq_sum(wq * q), _seq_sum(wq * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, q)
        better = (det > 0) & (cur < best)
        best_q = torch.where(better, q, best_q)
        best, scale, mn = (torch.where(better, a, b) for a, b in ((cur, best), (this_scale, scale), (this_min, mn)))
    zero = torch.zeros_like(scale)
    return torch.where(flat, zero, scale), -torch.where(flat, flat_min, mn), torch.where(flat, zero, best_q)


def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(do_rmse=true)``: codes from the absmax grid, then up to 5 passes of coordinate descent on
    the ``x^2``-weighted least-squares fit, one position at a time (a pass that changes nothing ends a sub-block's
    search in C; running it again changes nothing either).  Returns ``(scale [B], codes [n, B])``."""
    amax, mx = _signed_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    q = _nearest_int(_rdiv(-float(nmax), mx) * x).clamp_(-nmax, nmax - 1)
    q, sumlx, suml2 = _refine_codes(x, x * x, q, lo=-nmax, hi=nmax - 1, positive_before=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, q + nmax)


def _refine_codes(
    x: torch.Tensor,
    w: torch.Tensor,
    q: torch.Tensor,
    lo: int | None,
    hi: int,
    positive_before: bool,
    store: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's coordinate descent on the ``w``-weighted least-squares fit ``scale = sum(w x q) / sum(w q^2)``
    (``make_q3_quants``, ``make_qp_quants``): up to 5 passes, one position of every sub-block at a time, a code
    moving to ``round(x * sum_l2 / sum_lx)`` (clamped to ``[lo, hi]``) when that raises the fit's ``sum_lx^2 /
    sum_l2``.  The two C functions differ in which ``sum_l2`` must be positive: without the position
    (``positive_before``, make_qp_quants) or with its new code (make_q3_quants); ``store`` is how C keeps a code
    (make_qp_quants: a wrapped ``uint8_t``).  A pass that changes nothing ends a sub-block's search in C; running
    it again changes nothing either.  Returns ``(codes, sum_lx, sum_l2)``."""
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * q), _seq_sum(w * q * q)
    q = store(q)
    for _ in range(5):
        changed = torch.zeros(sumlx.shape, dtype=torch.bool, device=x.device)
        for i in range(x.shape[0]):
            qi = q[i]
            slx = sumlx - wx[i] * qi
            sl2 = suml2 - w[i] * qi * qi
            new = _nearest_int(x[i] * sl2 / slx).clamp_(lo, hi)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + w[i] * new * new
            positive = sl2 > 0 if positive_before else sl2_new > 0
            accept = (slx > 0) & positive & (new != qi) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            q[i] = torch.where(accept, store(new), qi)
            sumlx, suml2 = torch.where(accept, slx_new, sumlx), torch.where(accept, sl2_new, suml2)
            changed |= accept
        if not changed.any():
            break
    return q, sumlx, suml2


def _make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(rmse_type=1, qw)``: the weighted (``qw [n, B]``, else ``x^2``) least-squares scale of the
    best of 19 grids ``-(nmax + 0.1 * is) / max``.  Returns ``(scale [B], codes [n, B])``, the codes ``l + nmax``
    of that grid (0 in an all-zero group)."""
    amax, mx = _signed_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x

    def fit(numerator: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = _nearest_int(_rdiv(numerator, mx) * x).clamp_(-nmax, nmax - 1)
        return q, _seq_sum(wx * q), _seq_sum(w * q * q)

    best_q, sumlx, suml2 = fit(-float(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        q, sumlx, suml2 = fit(-_c_float(nmax, np.float32(0.1) * np.float32(step)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_q = torch.where(better, q, best_q)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, best_q + nmax)


def _make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants``: the importance path's quantization of non-negative sub-block scales (or mins) ``x [n,
    B]`` to integer levels ``[0, nmax]``: the best of 9 grids ``(nmax + 0.1 * is) / max`` by ``w``-weighted squared
    error, then up to 5 passes of coordinate descent on the weighted least-squares fit (as ``_make_q3_quants``).
    The levels live in a C ``uint8_t`` (wrapped) where C stores them, plain ints where C keeps an ``int``.
    Returns ``(scale [B], levels [n, B])``, both 0 where ``max < GROUP_MAX_EPS``."""
    mx = x.amax(0)
    zero = mx < GROUP_MAX_EPS

    def grid(iscale: torch.Tensor) -> torch.Tensor:
        return _nearest_int(iscale * x).clamp_(max=nmax)

    def mse(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        diff = x - scale * q
        return _seq_sum(w * diff * diff)

    iscale = _rdiv(float(nmax), mx)
    best = mse(_rdiv(1.0, iscale), _wrap(_nearest_int(iscale * x), signed=False))
    for step in (*range(-4, 0), *range(1, 5)):
        iscale_is = _rdiv(_c_float(np.float32(0.1) * np.float32(step), nmax), mx)
        err = mse(_rdiv(1.0, iscale_is), grid(iscale_is))
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, iscale_is, iscale)
    q, sumlx, suml2 = _refine_codes(
        x, w, grid(iscale), lo=None, hi=nmax, positive_before=True, store=lambda t: _wrap(t, signed=False)
    )
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, q)


# ----------------------------------------------------------------------------------------------------------------
# the importance path (quant_weights != NULL): per-weight search weights and the weighted super-block scales


def search_weights(t: GGUFType, x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor | None:
    """What llama.cpp's ``quantize_row_*_impl`` weighs each weight of rows ``x [R, cols]`` by, given the
    importance matrix row ``importance [cols]`` (``qw``): ``qw * sqrtf(sigma2 + x^2)`` with ``sigma2`` the mean
    ``x^2`` of the whole row (legacy types), of the super-block (q2_k) or twice that (q3_k q4_k q5_k); ``qw``
    itself for q6_k; None for q8_0, whose quantizer ignores it.  Returns float32 ``[R * cols / block, block]``."""
    if t.name == "q8_0":
        return None
    rows, cols = x.shape
    qw = importance.reshape(1, -1, t.block_size).expand(rows, -1, -1).reshape(-1, t.block_size)
    if t.name == "q6_k":
        return qw.contiguous()
    x2 = x * x
    if not t.is_k_quant:  # sum_x2 / n_per_row over the whole row
        sigma2 = (_seq_sum(x2.T.contiguous()) / cols).repeat_interleave(cols // t.block_size).unsqueeze(-1)
    else:
        sum_x2 = _seq_sum(_sub_major(x2, t.block_size))
        sigma2 = (sum_x2 / t.block_size if t.name == "q2_k" else 2 * sum_x2 / t.block_size).unsqueeze(-1)
    xb = x.reshape(-1, t.block_size)
    return qw * _sqrt(sigma2 + xb * xb)


def _sub_weights(t: GGUFType, weights: torch.Tensor) -> torch.Tensor:
    """``sw [N, n_sub]``: each sub-block's summed search weights, what the importance path weighs the sub-block
    scales (and mins) by when it stores them."""
    return _seq_sum(_sub_major(weights, t.sub_block)).view(-1, t.n_sub)


def _by_group(value: torch.Tensor, sw: torch.Tensor, fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
    """``fn`` on ``value`` / ``sw [..., n_sub]`` laid out as ``[n_sub, groups]``; ``(per group [...], levels [...,
    n_sub])``."""
    shape = value.shape
    scale, levels = fn(value.reshape(-1, shape[-1]).T.contiguous(), sw.reshape(-1, shape[-1]).T.contiguous())
    return scale.reshape(shape[:-1]), levels.T.reshape(shape)


def qp_levels(value: torch.Tensor, sw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q2_k / q4_k / q5_k's importance-path storage of sub-block scales or mins ``[..., n_sub]`` (``make_qp_quants``
    weighted by ``sw``): ``(levels, fp16 super-block scale)``; q4_k / q5_k keep at most 63 (q5_k says so, q4_k's
    levels never exceed it)."""
    scale, levels = _by_group(value, sw, lambda v, s: _make_qp_quants(v, nmax, s))
    return levels.clamp(max=nmax), scale.half()


def q3_k_levels(value: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q3_k's importance-path storage of sub-block scales ``[..., 16]`` (``make_qx_quants(32, rmse_type=1, sw)``):
    ``(signed levels in [-32, 31], fp16 d)``; an all-zero super-block stores 0 (-32 once offset) and ``d = 0``."""
    scale, levels = _by_group(value, sw, lambda v, s: _make_qx_quants(v, 32, s))
    return levels - 32, scale.half()


def _search_q2_k(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    n, xs = x.shape[0], _sub_major(x, t.sub_block)
    if qw is None:
        scale, the_min, q = _make_qkx2_quants(xs, xs.abs(), 3, -0.5, 15, use_mad=True)
    else:  # make_qkx3_quants
        scale, the_min, q = _make_qkx2_quants(xs, _sub_major(qw, t.sub_block), 3, -0.9, 36, False, rdelta=0.05)
    return BlockScales(scale.view(n, t.n_sub), the_min.view(n, t.n_sub), _block_codes(q, n))


def _search_q3_k(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    n, xs = x.shape[0], _sub_major(x, t.sub_block)
    scale, q = _make_q3_quants(xs, 4) if qw is None else _make_qx_quants(xs, 4, _sub_major(qw, t.sub_block))
    return BlockScales(scale.view(n, t.n_sub), codes=_block_codes(q, n))


def _search_q45_k(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    n, xs = x.shape[0], _sub_major(x, t.sub_block)
    if qw is None:
        rmin, nstep = (-1.0, 20) if t.name == "q4_k" else (-0.5, 15)
        weights = _sqrt(_seq_sum(xs * xs) / t.sub_block) + xs.abs()
        scale, the_min, q = _make_qkx2_quants(xs, weights, t.max_code, rmin, nstep, use_mad=False)
    else:  # make_qkx3_quants
        ws = _sub_major(qw, t.sub_block)
        scale, the_min, q = _make_qkx2_quants(xs, ws, t.max_code, -0.9, 36, use_mad=False, rdelta=0.05)
    return BlockScales(scale.view(n, t.n_sub), the_min.view(n, t.n_sub), _block_codes(q, n))


def _search_q6_k(t: GGUFType, x: torch.Tensor, qw: torch.Tensor | None = None) -> BlockScales:
    n = x.shape[0]
    scale, q = _make_qx_quants(_sub_major(x, t.sub_block), 32, None if qw is None else _sub_major(qw, t.sub_block))
    return BlockScales(scale.view(n, t.n_sub), codes=_block_codes(q, n))


# ----------------------------------------------------------------------------------------------------------------
# K-quant super-blocks: the second half of quantize_row_q{2,3,4,5,6}_K_ref


def _requantize(
    t: GGUFType, x: torch.Tensor, step: torch.Tensor, shift: torch.Tensor | None, s: BlockScales, v: torch.Tensor | None
) -> torch.Tensor:
    """The last pass of every ``*_K_ref``: codes ``clamp(nearest_int((x [+ shift]) / step [+ v]), lo, hi) - lo``
    from the stored scales (``step, shift: [N, n_sub]``, ``lo = -code_offset``).  Sub-blocks whose step is 0 keep
    the search's codes (``s.codes``) in C; without them they get ``code_offset``: either way the value is ``-shift``.
    Returns uint8 ``[N, block]``."""
    xb = x.view(x.shape[0], t.n_sub, t.sub_block)
    num = xb if shift is None else xb + shift.unsqueeze(-1)
    ratio = num / step.unsqueeze(-1)
    if v is not None:
        ratio = ratio + v.view(xb.shape)
    lo = -t.code_offset
    q = _nearest_int(ratio).clamp_(lo, t.max_code + lo) - lo
    kept = torch.full_like(q, float(t.code_offset)) if s.codes is None else s.codes.view(xb.shape)
    return torch.where((step == 0).unsqueeze(-1), kept, q).to(torch.uint8).flatten(1)


def _q2_k_levels(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q2_k's 4-bit quantization of the sub-block scales (or mins) ``[N, 16]``: ``(levels as C's int, fp16 super
    scale)``, both zero where no value is positive."""
    top = _positive_max(value)
    levels = _nearest_int(_rdiv(15.0, top).unsqueeze(-1) * value).to(torch.int32)
    positive = top > 0
    return torch.where(positive.unsqueeze(-1), levels, 0), torch.where(positive, top / 15, 0.0).half()


def q2_k_scale_levels(value: torch.Tensor, sw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q2_k's stored scales or mins: ``_q2_k_levels`` (``*_ref``), else weighted by ``sw`` (importance path)."""
    if sw is None:
        return _q2_k_levels(value)
    levels, d = qp_levels(value, sw, 15)
    return levels.to(torch.int32), d


def _store_q2_k(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    ls, d = q2_k_scale_levels(s.scales, sw)
    lm, dmin = q2_k_scale_levels(s.mins, sw)
    byte = ((ls & 0xFF) | (lm << 4)) & 0xFF  # the stored byte: scale in the low nibble, min in the high one
    scales, mins = (byte & 0xF).to(torch.uint8), (byte >> 4).to(torch.uint8)
    step = d.float().unsqueeze(-1) * scales
    shift = dmin.float().unsqueeze(-1) * mins
    return Blocks(_requantize(t, x, step, shift, s, v), d, dmin=dmin, scales=scales, mins=mins)


def _store_q3_k(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    if sw is not None:
        scales, d = q3_k_levels(s.scales, sw)
        step = d.float().unsqueeze(-1) * scales
        return Blocks(_requantize(t, x, step, None, s, v), d, scales=scales.to(torch.int8))
    _, top = _signed_absmax(s.scales, -1)
    nonzero = (top != 0).unsqueeze(-1)
    iscale = _rdiv(-32.0, top)
    levels = _wrap(_nearest_int(iscale.unsqueeze(-1) * s.scales), signed=True).clamp_(-32, 31)
    scales = torch.where(nonzero, levels, -32.0)  # an all-zero super-block stores 0, i.e. -32 once offset
    d = torch.where(top != 0, _rdiv(1.0, iscale), torch.zeros_like(top)).half()
    step = d.float().unsqueeze(-1) * scales
    return Blocks(_requantize(t, x, step, None, s, v), d, scales=scales.to(torch.int8))


def _store_q45_k(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    stored = []
    for value in (s.scales, s.mins):  # 6-bit scales and mins against fp16 d / dmin
        if sw is not None:
            levels, top_d = qp_levels(value, sw, 63)
            stored.append((levels.to(torch.uint8), top_d))
            continue
        top = _positive_max(value)
        inv = torch.where(top > 0, _rdiv(63.0, top), torch.zeros_like(top))
        levels = _wrap(_nearest_int(inv.unsqueeze(-1) * value), signed=False).clamp_(max=63)
        stored.append((levels.to(torch.uint8), (top / 63).half()))
    (scales, d), (mins, dmin) = stored
    step = d.float().unsqueeze(-1) * scales
    shift = dmin.float().unsqueeze(-1) * mins
    return Blocks(_requantize(t, x, step, shift, s, v), d, dmin=dmin, scales=scales, mins=mins)


def _store_q6_k(t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None, sw=None) -> Blocks:
    amax, top = _signed_absmax(s.scales, -1)
    zero = amax < GROUP_MAX_EPS  # the whole super-block is stored as zero bytes
    iscale = _rdiv(-128.0, top)
    d = torch.where(zero, 0.0, _rdiv(1.0, iscale)).half()
    levels = _wrap(_nearest_int(iscale.unsqueeze(-1) * s.scales).clamp_(max=127), signed=True)
    scales = torch.where(zero.unsqueeze(-1), 0.0, levels)
    step = d.float().unsqueeze(-1) * scales
    codes = torch.where(zero.unsqueeze(-1), 0, _requantize(t, x, step, None, s, v)).to(torch.uint8)
    return Blocks(codes, d, scales=scales.to(torch.int8))


_Search = Callable[[GGUFType, torch.Tensor, torch.Tensor | None], BlockScales]
_Store = Callable[[GGUFType, torch.Tensor, BlockScales, torch.Tensor | None, torch.Tensor | None], Blocks]
WEIGHTED_STORE = ("q2_k", "q3_k", "q4_k", "q5_k")  # whose stage 2 the importance path weighs (by sw)
_STAGES: dict[str, tuple[_Search, _Store]] = {
    **dict.fromkeys(("q4_0", "q5_0"), (_search_legacy_sym, _store_legacy_sym)),
    **dict.fromkeys(("q4_1", "q5_1"), (_search_legacy_min, _store_legacy_min)),
    "q8_0": (_search_q8_0, _store_q8_0),
    "q2_k": (_search_q2_k, _store_q2_k),
    "q3_k": (_search_q3_k, _store_q3_k),
    **dict.fromkeys(("q4_k", "q5_k"), (_search_q45_k, _store_q45_k)),
    "q6_k": (_search_q6_k, _store_q6_k),
}


def search_blocks(t: GGUFType, x: torch.Tensor, weights: torch.Tensor | None = None) -> BlockScales:
    """First stage on float32 blocks ``x [N, block_size]``: the scales (and mins, and codes) llama.cpp's search
    picks before anything is rounded to what the file stores.  ``weights``: ``search_weights``' ``[N,
    block_size]`` for the importance path (``quant_weights != NULL``), None for ``*_ref``."""
    return _STAGES[t.name][0](t, x, weights)


def store_blocks(
    t: GGUFType, x: torch.Tensor, s: BlockScales, v: torch.Tensor | None = None, weights: torch.Tensor | None = None
) -> Blocks:
    """Second stage: the stored fields of blocks ``x [N, block_size]`` given their float scales ``s``: K-quant
    scales and mins rounded to integers against fp16 super-block scales (by the importance path's weighted fit
    where ``weights`` are given, for the types in ``WEIGHTED_STORE``), every code recomputed from the stored
    values (legacy types: from the float32 ``d``, as C does, unless ``s.codes`` are given: the importance path
    stores its search's codes as they are); ``v [N, block_size]`` is added before rounding."""
    sw = _sub_weights(t, weights) if weights is not None and t.name in WEIGHTED_STORE else None
    return _STAGES[t.name][1](t, x, s, v, sw)
