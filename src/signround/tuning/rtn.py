"""Round-to-nearest, plain and optimised.

Plain RTN is ``alpha = beta = 1`` (the full group range).  Optimised RTN — the reference's default when
``iters=0`` — picks per-group clipping factors ``alpha`` / ``beta`` in ``(0, 1]`` that minimise the
reconstruction error weighted by the calibration activations' energy per input feature
(``E[x_j^2]``, the diagonal of the layer's Hessian).  Because it searches the same ``alpha`` / ``beta``
that SignRound tunes, its result is exactly representable as a starting point for tuning.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, cast

import torch

from ..quant import gguf
from ..quant.gguf_tunable import search_range, to_gguf
from ..quant.int import GroupedWeight, scale_and_zero
from ..schemes import LayerSpec, gguf_type_of

# Clip factors tried, largest first (ties keep the wider range): a coarse grid for all groups, then a fine
# one around each group's coarse winner (resolution 0.005 for ~40 evaluations instead of ~100).
DEFAULT_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.00 .. 0.50
FINE_OFFSETS = tuple(round(0.005 * i, 3) for i in range(-4, 5))
FACTOR_MIN = 0.3


def plain_rtn_params(w: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha = beta = 1`` per group."""
    gw = GroupedWeight.of(w, spec.group_size)
    ones = torch.ones_like(gw.wmin)
    return ones, ones.clone()


def _weighted_group_error(
    gw: GroupedWeight,
    spec: LayerSpec,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    weights: torch.Tensor,
    scale_dtype: torch.dtype,
) -> torch.Tensor:
    """Sum over each group of ``weight_j * (w_j - q(w_j))^2`` -> ``[out, G]``.

    The search calls this ~90 times per layer, so it works in place on one temporary.
    """
    scale, zero = scale_and_zero(gw.wmin, gw.wmax, spec, alpha, beta, scale_dtype)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    err = torch.div(gw.wg, scale).round_()
    if spec.sym:  # the zero point is the constant 2^(b-1): clamp the signed code directly
        half = 2 ** (spec.bits - 1)
        err.clamp_(-half, half - 1)
    else:  # scalar clamp bounds (much faster on CPU than per-group tensor bounds)
        err.add_(zero).clamp_(0, 2**spec.bits - 1).sub_(zero)
    return err.mul_(scale).sub_(gw.wg).square_().mul_(weights).sum(-1)


@torch.no_grad()
def optimized_rtn_params(
    w: torch.Tensor,
    spec: LayerSpec,
    importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(alpha, beta)`` from a grid search of the activation-weighted error.

    ``importance`` is ``E[x^2]`` per input feature ``[in]`` (uniform when ``None``).  The search first
    shrinks both ends together (coarse grid, then a fine grid around each group's winner), then each end
    alone with the other fixed.  Loops run over candidate factors, never over groups.
    """
    w = w.float()
    gw = GroupedWeight.of(w, spec.group_size)
    if importance is None:
        weights = torch.ones_like(gw.wg[0])
    else:
        imp = importance.float().to(w.device)
        imp = imp + 1e-6 * imp.mean().clamp(min=1e-12)  # dead inputs still count a little
        weights = imp.reshape(gw.wg.shape[1], gw.wg.shape[2])

    alpha = torch.ones_like(gw.wmin)
    beta = torch.ones_like(gw.wmin)
    best = _weighted_group_error(gw, spec, alpha, beta, weights, scale_dtype)

    def sweep(factors: list[torch.Tensor], update_alpha: bool, update_beta: bool) -> None:
        nonlocal best
        for f in factors:
            f = f.clamp(FACTOR_MIN, 1.0)
            a = f if update_alpha else alpha
            b = f if update_beta else beta
            err = _weighted_group_error(gw, spec, a, b, weights, scale_dtype)
            better = err < best
            best = torch.where(better, err, best)
            if update_alpha:
                alpha.copy_(torch.where(better, f, alpha))
            if update_beta:
                beta.copy_(torch.where(better, f, beta))

    def coarse() -> list[torch.Tensor]:
        return [torch.full_like(alpha, factor) for factor in grid]

    def fine(around: torch.Tensor) -> list[torch.Tensor]:
        return [around + delta for delta in FINE_OFFSETS if delta != 0]

    sweep(coarse(), True, True)
    sweep(fine(alpha.clone()), True, True)  # alpha == beta after the joint sweeps
    # One end at a time: for asym the ends are independent; for sym this can also flip which end sets the
    # scale (the end mapped onto the extra negative code of the full-range grid).
    for update_alpha in (False, True):
        sweep(coarse(), update_alpha, not update_alpha)
        sweep(fine((alpha if update_alpha else beta).clone()), update_alpha, not update_alpha)
    return alpha, beta


# Legacy GGUF types whose grid is the symmetric full-range integer grid of int.py (code ``round(w / d) + 2^(b-1)``,
# ``d`` fp16, blocks of 32): q4_0 is W4G32 sym, q5_0 W5G32 sym, so int.py's optimised RTN searches them too.
LEGACY_SYMMETRIC_GGUF = ("q4_0", "q5_0")


@torch.no_grad()
def gguf_legacy_start(
    w: torch.Tensor, spec: LayerSpec, importance: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], Any] | None:
    """A q4_0 / q5_0 layer's start: the tunable grid SignRound moves from, and the exact blocks judged as the start.

    The exact start is, per 32-weight block, the better of llama.cpp's importance-matrix quantization
    (``llama-quantize --imatrix``'s bytes) and optimised RTN's clipping of the block's own range, by the
    activation-weighted error ``sum_j E[x_j^2] (w_j - q(w_j))^2`` (llama.cpp weighs its search by ``qw * sqrt(sigma^2
    + x^2)``, not by the inputs' energy alone).  The tunable grid ``(lo, hi, alpha, beta)`` (``quant.gguf_tunable``)
    is optimised RTN's clipping of every block's own range, as int.py's W4G32 / W5G32 sym tuner starts: tuning from
    llama.cpp's blocks (their search's codes, not nearest ones) ends at higher block losses.  bench/gguf_blocks.py,
    SmolLM2's first 6 blocks in q4_0, KL: 0.0434 from llama.cpp's start, 0.0356 from this exact start, and tuned
    (iters 50) 0.0366 from llama.cpp's blocks, 0.0334 from this grid.  None for the other GGUF types (their grids
    are not int.py's)."""
    t = gguf_type_of(spec.data_type)
    if t is None or t.name not in LEGACY_SYMMETRIC_GGUF:
        return None
    w = w.detach().float()
    weights = importance.float().to(w.device)
    # int.py's grid arithmetic reads only bits / sym (any width); LayerSpec itself admits the widths int packers store
    twin = cast(LayerSpec, SimpleNamespace(bits=t.bits, group_size=t.block_size, sym=True))
    alpha, beta = optimized_rtn_params(w, twin, weights, scale_dtype=torch.float16)
    full = search_range(w, t.name, None)
    llama, clipped = gguf.quantize(w, t.name, weights), to_gguf(w, t.name, *full, alpha, beta)

    def block_error(q: Any) -> torch.Tensor:
        return ((w - gguf.dequantize(q)).square() * weights).reshape(w.shape[0], -1, t.block_size).sum(-1)

    take = block_error(clipped) < block_error(llama)
    start = dataclasses.replace(
        llama,
        codes=torch.where(take.repeat_interleave(t.block_size, dim=1), clipped.codes, llama.codes),
        d=torch.where(take, clipped.d, llama.d),
    )
    return (*full, alpha, beta), start
