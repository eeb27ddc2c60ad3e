"""Tunable GGUF grids: llama.cpp's block quantization as SignRound's per-group ``(scale, zero)``, bit for bit.

Why: SignRound tunes, per group, a clipping pair ``alpha`` / ``beta`` and a per-weight rounding offset ``v``
(``signround.quant.int``).  A GGUF type dequantizes every sub-block (``GGUFType.sub_block`` weights) as
``step * (code - code_offset) - shift``, i.e. ``scale * (code - zero)`` with a per-sub-block ``scale = step`` and
``zero = code_offset + shift / step``, so it fits the same tuning, with the sub-block as the group, provided the
per-group values are computed the way llama.cpp computes and stores them.  This module does that, so that what
tuning optimises is exactly what ``llama-quantize`` would have written for the tuned parameters:

* ``search_range(w, t)``: per sub-block ``(lo, hi)``, the ends of llama.cpp's own (stage 1, ``search_scales``)
  grid, such that ``alpha = beta = 1`` and ``v = 0`` reproduce ``quantize(w, t)`` byte for byte;
* ``gguf_grid`` / ``gguf_scale_and_zero``: ``lo * alpha`` / ``hi * beta`` -> the float sub-block scale (and min)
  -> llama.cpp's stage 2 (integer sub-block scales / mins against fp16 super-block ``d`` / ``dmin``; fp16 ``d`` /
  ``m`` for the legacy types) -> the stored per-group step and shift, with straight-through gradients to
  ``alpha`` / ``beta``;
* ``gguf_fake_quant``: the fused quantize-dequantize with int.py's straight-through gradients, computing every code
  with llama.cpp's own float expression, so its codes and values *are* ``quantize_with_scales`` /
  ``dequantize``'s;
* ``to_gguf``: the stored blocks for tuned ``(alpha, beta, v)``, through ``quantize_with_scales``.

How ``alpha`` / ``beta`` act, per type (all shrink an end of ``[lo, hi]`` toward 0, as int.py's ``wmin * alpha``
/ ``wmax * beta``):

* with a min (q2_k q4_k q5_k; q4_1 q5_1): int.py's asymmetric rule without rounding the zero point (the scale
  computed in float64 and rounded once to float32, which the ranges below are fitted to):
  ``scale = (hi' - lo') / (2^b - 1)``, ``min = -lo'`` (the value of code 0); llama.cpp then stores the min itself
  (K: 4/6-bit ``mins`` against ``dmin``; legacy: fp16 ``m``), so the zero point ``min / scale`` is fractional.
  ``lo`` / ``hi``: the search's grid ends ``-mins`` and ``-mins + (2^b - 1) * scales`` (top fitted); for q4_1 /
  q5_1 without an importance these are the block's min and (about) its max, what llama.cpp computes ``d`` and
  ``m`` from.
* with an importance (``search_range(..., importance)``), every type but q8_0 starts from the ends of its
  weighted search's grid the same way (q4_0 / q5_0 then as the symmetric K-quants below).
* symmetric K-quants (q3_k q6_k) and q4_0 / q5_0: int.py's full-range symmetric rule: the end of larger magnitude
  ``e`` (after shrinking) maps to code 0, ``scale = -e / 2^(b-1)`` (negative when ``e > 0``, as llama.cpp's scales
  are); positive wins ties.  ``lo`` / ``hi``: q4_0 / q5_0: the block's min and max (llama.cpp's ``d = max / -8``
  is that rule); q3_k / q6_k: the ends ``-2^(b-1) * s`` and ``(2^(b-1) - 1) * s`` of the search's grid (its scale
  ``s`` is a weighted least-squares fit, not a range, so the data's min / max would not give it back).  Shrinking
  the big end below ``(2^(b-1) - 1) / 2^(b-1)`` of itself hands the scale to the other end (and flips its sign),
  exactly as in int.py.
* q8_0: ``scale = max(-lo', hi') / 127`` (its codes are ``-127..127`` around 128, not full range), ``lo`` / ``hi``
  the block's min and max.

Exactness (the codes *and* the dequantized values, bit for bit, for any ``alpha`` / ``beta`` / ``v``): the code is
computed as llama.cpp computes it, not as ``round(w / scale + zero + v)``:

* K-quants: ``nearest_int((w + shift) / step + v)`` (``shift = dmin * mins``, 0 for q3_k / q6_k), one IEEE op at
  a time in that order, then ``+ code_offset`` and clamped; where ``step == 0`` llama.cpp keeps a code that does
  not change the value (``code_offset``; 0 in a q6_k all-zero super-block);
* legacy: ``trunc((w - min) * (1 / d32) + v + code_offset + 0.5)`` (q8_0: ``roundf``), with the *float32* ``d32``
  (and min) that stage 1 computes, while the values use the stored fp16 ``d`` (and ``m``);
* values: ``step * (code - code_offset) - shift`` (``dequantize``'s order; ``d * scales`` and ``dmin * mins`` are
  exact in float32).

``int.quantize``'s kernel (``_GroupQDQ`` / ``_QDQLinear``) computes ``round(w / scale + v) + zero`` and
``(code - zero) * scale``: adding the zero *after* rounding is right for an integer zero only, so with a fractional
one (every type with a min) it drops the min from the grid altogether; and its one scale cannot be both the float32
``d`` the legacy codes use and the fp16 ``d`` their values use.  It is exact, unchanged, for q3_k and q6_k (integer
zero ``code_offset``, codes ``round(w / step + v)``) wherever no sub-block's stored step is 0.  ``gguf_fake_quant``
is that kernel with the two generalisations the others need (see ``_GGUFQDQ``).

Lengths: ``lo`` / ``hi`` / ``alpha`` / ``beta`` / scale / zero are ``[rows, G]`` with ``G = cols / sub_block``
(16 or 32 weights per group for the K-quants, 32 for the legacy types; sub-block ``j`` of super-block ``b`` is
group ``b * n_sub + j``).  ``lo`` / ``hi`` are float64: a q4_k grid's top end ``-min + 15 * scale`` is not a
float32 in general, and no float32 pair ``(lo, hi)`` can give llama.cpp's float32 scale back through ``(hi - lo) /
15`` for every scale (in some binades the float32 ``hi`` are spaced wider than ``15`` float32 scales are); in
float64 it is exact.

Pure tensor math, no I/O, device-agnostic torch ops (checked on CPU; the oracle modules are CPU-verified too).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .gguf import GGUFQuantized, GGUFScales, GGUFType, gguf_type, quantize_with_scales, search_scales, search_weights_of
from .gguf_search import (
    WEIGHTED_STORE,
    _first_min_max,
    _nearest_int,
    _positive_max,
    _rdiv,
    _seq_sum,
    _signed_absmax,
    _wrap,
    q2_k_scale_levels,
    q3_k_levels,
    qp_levels,
)
from .gguf_types import GROUP_MAX_EPS, check_shape

__all__ = [
    "GGUFGrid",
    "gguf_fake_quant",
    "gguf_grid",
    "gguf_scale_and_zero",
    "search_range",
    "stage2_weights",
    "to_gguf",
]

_FIT_TRIES = 8  # float64 nudges of a K-quant grid's top end until (hi - lo) / maxq gives the search's scale back


class GGUFGrid(NamedTuple):
    """A GGUF type's per-sub-block parameters for tuned ``alpha`` / ``beta``, float32 ``[rows, G]`` each.

    What stage 2 is handed (``GGUFScales``' convention, flattened to groups), so ``to_gguf`` can store it:

    * ``scales``: the float sub-block scales (legacy types: the float32 block ``d``);
    * ``mins``: the float mins, types with a min only (legacy: the negated float32 block minimum), else None.

    What stage 2 stores, as the per-group numbers the codes and values are computed with (straight-through: the
    forward value is the stored one, the gradient is the float value's it was rounded from):

    * ``step``: ``d * scales[j]`` (K-quants) or the fp16 ``d`` (legacy), multiplying ``code - code_offset``;
    * ``shift``: subtracted from that: ``dmin * mins[j]`` (q2_k q4_k q5_k) or ``-m`` (q4_1 q5_1), else None;
    * ``code_scale``: what ``w`` is scaled by for its code: divided by ``step`` itself (K-quants), multiplied by
      ``1 / d32`` with the *float32* ``d`` (legacy, as ``quantize_row_q*_ref`` does);
    * ``code_shift``: added to ``w`` before that: ``shift`` (K-quants), ``-min32`` (q4_1 q5_1), else None;
    * ``idle_code``: K-quants: the code where ``step == 0`` (llama.cpp keeps the search's there; without them
      ``quantize_with_scales`` writes ``code_offset``, and q6_k writes 0 for an all-zero super-block); None for
      the legacy types, whose codes are always computed.
    """

    scales: torch.Tensor
    mins: torch.Tensor | None
    step: torch.Tensor
    shift: torch.Tensor | None
    code_scale: torch.Tensor
    code_shift: torch.Tensor | None
    idle_code: torch.Tensor | None


# ----------------------------------------------------------------------------------------------------------------
# search_range: stage 1's grid as the range it spans


def _fit_top(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, maxq: int) -> torch.Tensor:
    """``hi`` nudged (float64 ulps) where ``float32((hi - lo) / maxq)`` is not ``scale``: ``lo + maxq * scale`` is
    exact in float64 unless ``|lo|`` exceeds ``maxq * scale`` by ~2^28, and then a few ulps fix it."""
    for _ in range(_FIT_TRIES):
        got = ((hi - lo) / maxq).float()
        wrong = got != scale
        if not bool(wrong.any()):
            break
        toward = torch.where(got > scale, -torch.inf, torch.inf).to(hi.dtype)
        hi = torch.where(wrong, torch.nextafter(hi, toward), hi)
    return hi


def _symmetric_range(t: GGUFType, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ends ``-offset * s`` and ``(max_code - offset) * s`` (both exact in float64) of a symmetric grid with
    float32 scale ``s``, ordered so that the full-range rule gives ``s`` back (signed zeros included)."""
    big, small = -t.code_offset * s.double(), (t.max_code - t.code_offset) * s.double()
    positive = s > 0  # s <= 0 (signed zeros included) puts the big end on top: the decoder picks it on ties
    return torch.where(positive, big, small), torch.where(positive, small, big)


def _min_range(t: GGUFType, s: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-mins, -mins + max_code * s)`` in float64, the top nudged until ``float32((hi - lo) / max_code)`` is
    ``s``: a grid with a min, from its float32 scale and min."""
    lo = -mins.double()
    return lo, _fit_top(lo, lo + t.max_code * s.double(), s, t.max_code)


@torch.no_grad()
def stage2_weights(w: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> torch.Tensor | None:
    """float32 ``[rows, cols / sub_block]``: per sub-block, the summed search weights llama.cpp's importance path
    stores q2_k .. q5_k's sub-block scales (and mins) by (``sw``); None without an importance or for the other
    types, whose stage 2 does not depend on it.  What ``gguf_grid`` / ``gguf_fake_quant`` take as
    ``sub_weights`` (computed once: a row's weights depend on the weight itself, not on the tuned parameters)."""
    t = gguf_type(type_name)
    if importance is None or t.name not in WEIGHTED_STORE:
        return None
    weights = search_weights_of(w, t.name, importance)
    rows, cols = weights.shape
    return _seq_sum(weights.reshape(-1, t.sub_block).T.contiguous()).reshape(rows, cols // t.sub_block)


@torch.no_grad()
def search_range(
    w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``, float64 ``[rows, cols / sub_block]``: per sub-block, the range of llama.cpp's own grid for
    ``w [rows, cols]`` (its stage 1, ``search_scales``), in the form ``gguf_grid`` reads, so that ``alpha = beta =
    1`` (or None) and ``v = 0`` give back exactly llama.cpp's float scales (and mins), hence ``quantize(w, t)``'s
    blocks: the tuning starts from llama.cpp's own result.  Which range each type uses is in the module docstring;
    it always satisfies ``lo <= hi``.  Float64 because a K-quant grid's top end is not a float32 in general.

    ``importance`` (float ``[cols]``): the range of llama.cpp's importance-matrix search instead (``search_scales``
    with it), for every type but q8_0 (which ignores it); the legacy types' ranges are then their weighted grids'
    ends, like the K-quants'.  Stored with the same importance (``to_gguf(..., importance=)``) the start is
    ``quantize(w, t, importance)`` (the legacy types given the search's codes, which llama.cpp keeps)."""
    t = gguf_type(type_name)
    rows, _ = check_shape(tuple(w.shape), t)
    x = w.detach().float()
    if t.is_k_quant or (importance is not None and t.name != "q8_0"):
        found = search_scales(x, t.name, importance)
        s = found.scales.reshape(rows, -1)
        if t.has_min:
            return _min_range(t, s, found.mins.reshape(rows, -1))
        return _symmetric_range(t, s)
    xb = x.reshape(rows, -1, t.block_size)
    if t.has_min:  # q4_1 / q5_1: llama.cpp's d and min (its float32 d is (max - min) / max_code)
        lo, hi = _first_min_max(xb, -1)
        return _min_range(t, (hi - lo) / t.max_code, -lo)
    elif t.name == "q8_0":
        lo, hi = xb.amin(-1), xb.amax(-1)
    else:  # q4_0 / q5_0: the signed largest magnitude, first on ties, is the end that wins
        _, mx = _signed_absmax(xb, -1)
        negative = mx < 0
        lo = torch.where(negative, mx, xb.amin(-1))
        hi = torch.where(negative, xb.amax(-1), mx)
        tie = negative & (hi == -lo)  # llama.cpp saw the negative one first; the decoder prefers the positive
        hi = torch.where(tie, torch.nextafter(hi, torch.zeros_like(hi)), hi)
        flat = mx == 0  # an all-zero block: d = mx / -offset keeps its signed zero
        lo = torch.where(flat, -t.code_offset * (mx / -t.code_offset), lo)
        hi = torch.where(flat, lo, hi)
    return lo.double(), hi.double()


# ----------------------------------------------------------------------------------------------------------------
# gguf_grid: (lo, hi, alpha, beta) -> float scales -> llama.cpp's stage 2, straight through


def _straight_through(stored: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``stored`` in the forward, ``value``'s gradient in the backward.  Written ``stored - (value - value)``
    (detached once) rather than ``stored + (value - value)`` so that a stored ``-0.0`` stays ``-0.0``: q3_k steps
    and legacy ``d`` can be negative zeros, and ``dequantize`` keeps them."""
    return stored.detach() - (value.detach() - value)


def _six_bit(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k / q5_k's stage 2 for scales or mins ``[..., n_sub]``: 6-bit levels against an fp16 super scale."""
    top = _positive_max(value)
    inv = torch.where(top > 0, _rdiv(63.0, top), torch.zeros_like(top))
    levels = _wrap(_nearest_int(inv.unsqueeze(-1) * value), signed=False).clamp_(max=63)
    return levels, (top / 63).half()


@torch.no_grad()
def _stored_k(
    t: GGUFType, sf: torch.Tensor, mf: torch.Tensor | None, sw: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``(step, shift or None, idle code)`` ``[..., n_sub]`` that ``store_blocks`` derives from float scales
    ``sf`` (and mins ``mf``): the same operations as ``gguf_search._store_*``, on the scales only (no weights);
    ``sw`` (``stage2_weights``): the importance path's weighted storing of q2_k .. q5_k's scales."""
    idle = torch.full_like(sf, float(t.code_offset))
    if t.name == "q2_k":
        ls, d = q2_k_scale_levels(sf, sw)
        lm, dmin = q2_k_scale_levels(mf, sw)
        byte = ((ls & 0xFF) | (lm << 4)) & 0xFF  # the stored byte: scale in the low nibble, min in the high one
        scales, mins = (byte & 0xF).float(), (byte >> 4).float()
        return d.float().unsqueeze(-1) * scales, dmin.float().unsqueeze(-1) * mins, idle
    if t.has_min:  # q4_k / q5_k
        if sw is None:
            (scales, d), (mins, dmin) = _six_bit(sf), _six_bit(mf)
        else:
            (scales, d), (mins, dmin) = qp_levels(sf, sw, 63), qp_levels(mf, sw, 63)
        return d.float().unsqueeze(-1) * scales, dmin.float().unsqueeze(-1) * mins, idle
    if t.name == "q3_k" and sw is not None:
        scales, d = q3_k_levels(sf, sw)
        return d.float().unsqueeze(-1) * scales, None, idle
    if t.name == "q3_k":
        _, top = _signed_absmax(sf, -1)
        iscale = _rdiv(-32.0, top)
        levels = _wrap(_nearest_int(iscale.unsqueeze(-1) * sf), signed=True).clamp_(-32, 31)
        scales = torch.where((top != 0).unsqueeze(-1), levels, -32.0)
        d = torch.where(top != 0, _rdiv(1.0, iscale), torch.zeros_like(top)).half()
        return d.float().unsqueeze(-1) * scales, None, idle
    amax, top = _signed_absmax(sf, -1)  # q6_k
    zero = amax < GROUP_MAX_EPS  # stored as zero bytes, codes included
    iscale = _rdiv(-128.0, top)
    d = torch.where(zero, 0.0, _rdiv(1.0, iscale)).half()
    levels = _wrap(_nearest_int(iscale.unsqueeze(-1) * sf).clamp_(max=127), signed=True)
    scales = torch.where(zero.unsqueeze(-1), 0.0, levels)
    return d.float().unsqueeze(-1) * scales, None, torch.where(zero.unsqueeze(-1), 0.0, idle)


def _shrunk(end: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``end * factor`` in float64 (exact for float32 factors: a float32 product fits 48 bits)."""
    end = end.double()
    return end if factor is None else end * factor


def _k_grid(t: GGUFType, lo: torch.Tensor, hi: torch.Tensor, ste: bool, sw: torch.Tensor | None) -> GGUFGrid:
    """The float sub-block scales (and mins) from the shrunk float64 range, then stage 2 on whole super-blocks
    (``[rows, n_blocks, n_sub]``: every sub-block's stored value depends on its super-block's largest)."""
    rows = lo.shape[0]
    if t.has_min:  # int.py's asymmetric rule, the zero point left fractional; a negative scale is clamped to 0
        sf = ((hi - lo) / t.max_code).float()
        sf = torch.where(sf < 0, torch.zeros_like(sf), sf)
        mf: torch.Tensor | None = (-lo).float()
    else:  # int.py's full-range symmetric rule: the larger end maps to code 0
        big = torch.where(-lo > hi, lo, hi)
        sf, mf = (-big / t.code_offset).float(), None
    per_super = (rows, -1, t.n_sub)
    mf_super = None if mf is None else mf.detach().reshape(per_super)
    sw_super = None if sw is None else sw.reshape(per_super)
    step, shift, idle = (
        None if v is None else v.reshape(rows, -1)
        for v in _stored_k(t, sf.detach().reshape(per_super), mf_super, sw_super)
    )
    if ste:
        step = _straight_through(step, sf)
        shift = None if shift is None else _straight_through(shift, mf)
    return GGUFGrid(sf, mf, step, shift, step, shift, idle)


def _legacy_grid(t: GGUFType, lo: torch.Tensor, hi: torch.Tensor, ste: bool, sw: None = None) -> GGUFGrid:
    """The float32 ``d`` (and min) as ``quantize_row_q*_ref`` computes them from the (shrunk) block range."""
    lo32, hi32 = lo.float(), hi.float()
    mins = None
    if t.has_min:  # q4_1 / q5_1: in float64 then rounded once, as the K-quants' (search_range fits hi to it)
        d = ((hi - lo) / t.max_code).float()
        d = torch.where(d < 0, torch.zeros_like(d), d)  # where, not clamp: keeps llama.cpp's -0.0
        mins = -lo32
    elif t.name == "q8_0":
        d = torch.maximum(-lo32, hi32).abs() / 127  # abs: +0.0 like llama.cpp's amax of |x|
    else:  # q4_0 / q5_0
        d = torch.where(-lo32 > hi32, lo32, hi32) / -t.code_offset
    nonzero = d != 0
    code_scale = torch.where(nonzero, _rdiv(1.0, torch.where(nonzero, d, torch.ones_like(d))), torch.zeros_like(d))
    step = d.detach().half().float()
    shift = None if mins is None else -(-mins.detach()).half().float()  # -m, m = fp16(min)
    if ste:
        step = _straight_through(step, d)
        shift = None if shift is None else _straight_through(shift, mins)
    return GGUFGrid(d, mins, step, shift, code_scale, mins, None)


def gguf_grid(
    lo: torch.Tensor,
    hi: torch.Tensor,
    type_name: str,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    ste: bool = True,
    sub_weights: torch.Tensor | None = None,
) -> GGUFGrid:
    """Every per-group number a GGUF type's codes and values are computed from, for the range ``[lo * alpha,
    hi * beta]`` (``lo`` / ``hi`` from ``search_range``; ``alpha`` / ``beta`` anything broadcasting to ``[rows,
    G]``, None meaning 1).  The float sub-block scales (and mins) follow int.py's rules (module docstring); the
    stored values are llama.cpp's second stage of those, bit for bit.  ``ste``: the stored values pass gradients
    straight through to the float ones they round (so ``alpha`` / ``beta`` get gradients); False: no gradient
    through the rounding (the values are the same).  ``sub_weights``: ``stage2_weights`` (importance path:
    q2_k .. q5_k store their scales by a fit weighted by them), None for ``*_ref``'s storing."""
    t = gguf_type(type_name)
    if lo.shape != hi.shape or lo.dim() != 2 or lo.shape[1] % t.n_sub:
        raise ValueError(
            f"{t.name}: lo and hi must both be [rows, G] with G a multiple of {t.n_sub} (sub-blocks of a "
            f"{t.block_size}-weight block); got {tuple(lo.shape)} and {tuple(hi.shape)}"
        )
    with torch.set_grad_enabled(torch.is_grad_enabled() and ste):
        lo2, hi2 = _shrunk(lo, alpha), _shrunk(hi, beta)
        sw = None if sub_weights is None or t.name not in WEIGHTED_STORE else sub_weights.detach().float()
        return (_k_grid if t.is_k_quant else _legacy_grid)(t, lo2, hi2, ste, sw)


def gguf_scale_and_zero(
    lo: torch.Tensor,
    hi: torch.Tensor,
    type_name: str,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    ste: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group float32 ``(scale, zero)`` ``[rows, G]`` with ``dequantize``'s values ``= scale * (code - zero)``
    (exactly, in real numbers): ``scale = step``, ``zero = code_offset + shift / step`` (fractional for the types
    with a min; ``code_offset`` where ``step == 0``, whose sub-block is the constant ``-shift``).  For tuning with
    int.py's kernel: exact, unchanged, for q3_k / q6_k (where no step is 0); the other types need
    ``gguf_fake_quant``'s code formula (module docstring).  Gradients as in ``gguf_grid``."""
    t = gguf_type(type_name)
    g = gguf_grid(lo, hi, t.name, alpha, beta, ste)
    offset = torch.full_like(g.step, float(t.code_offset)).detach()
    if g.shift is None:
        return g.step, offset
    live = g.step != 0
    return g.step, torch.where(live, offset + g.shift / torch.where(live, g.step, torch.ones_like(g.step)), offset)


# ----------------------------------------------------------------------------------------------------------------
# the fused quantize-dequantize


def _round_code(t: GGUFType, u: torch.Tensor) -> torch.Tensor:
    """The unclamped code of ``u = (w + code_shift) scaled + v``, as llama.cpp rounds it: ``nearest_int`` (half
    to even, K-quants), ``roundf`` (half away from zero, q8_0), ``trunc(u + offset + 0.5)`` (q4/5_0, q4/5_1),
    written ``floor``: the same code once clamped to ``[0, maxq]``, and below 0 exactly where the weight is
    clipped (``trunc`` would call ``u + offset`` in ``(-1.5, -0.5)`` inside, for the gradient mask)."""
    if t.is_k_quant:
        return _nearest_int(u) + t.code_offset
    if t.name == "q8_0":
        a = u.abs()
        rounded = a.floor() + (a - a.floor() >= 0.5)
        return torch.where(u < 0, -rounded, rounded) + t.code_offset
    return (u + (t.code_offset + 0.5)).floor()


class _GGUFQDQ(torch.autograd.Function):
    """``step * (code - code_offset) - shift`` with ``code = clamp(rnd((w + code_shift) <scaled by> code_scale + v)
    + code_offset)``, llama.cpp's arithmetic, and int.py's straight-through gradients.

    This is ``int._GroupQDQ`` (``(clamp(round(w / s + v) + z) - z) * s``) generalised in the two ways GGUF needs,
    the hook int.py would take to tune GGUF with its own fused kernels:

    1. a per-group ``shift`` added to ``w`` *before* the scaling and subtracted from the value after, instead of a
       zero point added after rounding (an integer zero is ``shift = z * s``; GGUF's are fractional);
    2. separate code and value scales (``code_scale`` divided by for K-quants, where it is ``step``; ``1 / d32``
       multiplied by for the legacy types, whose values use the fp16 ``d``), with the type's rounding rule.

    With ``m`` the not-clipped mask (and not an idle ``step == 0`` sub-block), ``lvl = code - code_offset``,
    ``x = w + code_shift`` and ``g`` the incoming gradient, summed over each group:
      d/dv = g * step * m                d/dstep = sum g * lvl              d/dshift = -sum g
      d/dcode_scale = sum g * step * m * x * (-1 / code_scale^2 | 1)       (divided | multiplied)
      d/dcode_shift = sum g * step * m * (1 / code_scale | code_scale)
    For the K-quants ``code_scale is step`` and ``code_shift is shift``, which autograd adds up to int.py's
    ``d/ds = sum g * (lvl - m * x / s)`` and ``d/dshift = sum g * (m - 1)``.  Kept for the backward: the weight,
    the codes (uint8) and the mask (bool).
    """

    @staticmethod
    def forward(ctx, wg, v, code_scale, code_shift, step, shift, idle, t):  # type: ignore[override]
        x = wg.float() if code_shift is None else wg.float() + code_shift
        u = x / code_scale if t.is_k_quant else x * code_scale
        if v is not None:
            u = u + v
        pre = _round_code(t, u)
        inside = (pre >= 0) & (pre <= t.max_code)
        code = pre.clamp_(0, t.max_code)
        if idle is not None:
            dead = step == 0
            code = torch.where(dead, idle, code)
            inside &= ~dead
        value = step * (code - t.code_offset)
        if shift is not None:
            value = value - shift
        codes = code.to(torch.uint8)
        ctx.save_for_backward(wg, code_scale, code_shift, step, codes, inside)
        ctx.t = t
        ctx.mark_non_differentiable(codes)
        return value, codes

    @staticmethod
    def backward(ctx, grad, _grad_codes):  # type: ignore[override]
        wg, code_scale, code_shift, step, codes, inside = ctx.saved_tensors
        t = ctx.t
        need_v, need_cscale, need_cshift, need_step, need_shift = ctx.needs_input_grad[1:6]
        g = grad.float()
        g_in = g * inside
        grads: list[torch.Tensor | None] = [None] * 5
        if need_v:
            grads[0] = g_in * step
        if need_cscale or need_cshift:
            live = code_scale != 0
            safe = torch.where(live, code_scale, torch.ones_like(code_scale))
            if t.is_k_quant:  # u = x / c: du/dc = -x / c^2, du/dx = 1 / c
                dx = torch.where(live, step / safe, torch.zeros_like(safe))
                dc = -dx / safe
            else:  # u = x * c: du/dc = x, du/dx = c
                dx, dc = step * code_scale, step
            if need_cscale:
                x = wg.float() if code_shift is None else wg.float() + code_shift
                grads[1] = (g_in * x).sum(-1, keepdim=True) * dc
            if need_cshift:
                grads[2] = g_in.sum(-1, keepdim=True) * dx
        if need_step:
            grads[3] = (g * (codes.float() - t.code_offset)).sum(-1, keepdim=True)
        if need_shift:
            grads[4] = -g.sum(-1, keepdim=True)
        return None, *grads, None, None


def gguf_fake_quant(
    w: torch.Tensor,
    type_name: str,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    sub_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_hat, codes)`` for ``w [rows, cols]``: float32 ``w_hat`` differentiable in ``alpha`` / ``beta`` /
    ``v`` (straight-through rounding, as int.py's fake quantizer), uint8 ``codes``.  Both are, bit for bit,
    ``dequantize(to_gguf(w, ...))`` and ``to_gguf(w, ...).codes`` for the same arguments (the codes where a
    K-quant step is 0 being ``quantize_with_scales``' without search codes).  ``v``: float ``[rows, cols]`` in
    ``[-0.5, 0.5]``, None meaning 0.  ``sub_weights``: ``stage2_weights(w, t, importance)`` to match ``to_gguf(...,
    importance=importance)``."""
    t = gguf_type(type_name)
    rows, cols = check_shape(tuple(w.shape), t)
    g = gguf_grid(lo, hi, t.name, alpha, beta, sub_weights=sub_weights)
    wg = w.reshape(rows, -1, t.sub_block)
    vg = None if v is None else v.float().reshape(wg.shape)

    def per_group(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.unsqueeze(-1)

    code_scale, code_shift, step, shift, idle = map(
        per_group, (g.code_scale, g.code_shift, g.step, g.shift, g.idle_code)
    )
    if t.is_k_quant:  # one tensor each, so that autograd adds the code's and the value's gradients
        code_scale, code_shift = step, shift
    w_hat, codes = _GGUFQDQ.apply(wg, vg, code_scale, code_shift, step, shift, idle, t)
    return w_hat.reshape(rows, cols), codes.reshape(rows, cols)


@torch.no_grad()
def to_gguf(
    w: torch.Tensor,
    type_name: str,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    codes: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> GGUFQuantized:
    """The blocks llama.cpp stores for tuned ``(alpha, beta, v)``: ``gguf_grid``'s float scales (and mins) through
    ``quantize_with_scales`` (stage 2: integer sub-block scales, fp16 super-block scales, every code recomputed).
    ``codes``: ``search_scales(w, t).codes`` to be byte-identical with ``quantize(w, t)`` where a stored K-quant
    step is 0 (llama.cpp keeps its search's codes there); they change bytes only, never a dequantized value.

    ``importance``: stored as llama.cpp's importance-matrix path stores (``quantize_with_scales``); with the
    ranges ``search_range(w, t, importance)`` gives and ``codes = search_scales(w, t, importance).codes`` the
    start is ``quantize(w, t, importance)`` byte for byte.  The legacy types store those codes as they are
    (llama.cpp does), so they are taken only for the untuned start (``alpha`` / ``beta`` / ``v`` all None); the
    values of a legacy start without them use codes recomputed from the same stored scales."""
    t = gguf_type(type_name)
    rows, cols = check_shape(tuple(w.shape), t)
    legacy_codes = codes is not None and not t.is_k_quant and importance is not None
    if legacy_codes and not (alpha is None and beta is None and v is None):
        raise ValueError(f"{t.name}: the search's codes fit its own scales only; no alpha / beta / v with them")
    g = gguf_grid(lo, hi, t.name, alpha, beta, ste=False, sub_weights=stage2_weights(w, t.name, importance))
    per_block = (rows, cols // t.block_size, t.n_sub)
    mins = None if g.mins is None else g.mins.reshape(per_block)
    found = GGUFScales(g.scales.reshape(per_block), mins, codes if t.is_k_quant or legacy_codes else None)
    return quantize_with_scales(w, t.name, *found, v=v, importance=importance)
