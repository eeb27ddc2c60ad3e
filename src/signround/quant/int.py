"""Integer weight quantization arithmetic: the only place that knows scales and zero points.

Conventions (those of the reference tool, so checkpoints interoperate):

* Weights are quantized per group of ``group_size`` consecutive input features of each output row
  (``group_size=-1`` means one group per row).  A weight ``[out, in]`` is viewed as ``[out, G, gs]``.
* The range of every group always contains 0: ``wmin = min(min(w), 0)``, ``wmax = max(max(w), 0)``.
* ``alpha`` / ``beta`` (per group, in [0, 1]) shrink ``wmin`` / ``wmax`` (clipping); ``v`` (per weight,
  in [-0.5, 0.5]) shifts the rounding point.  All three are what SignRound tunes.
* Symmetric is the reference's *full-range* variant: the group's largest magnitude maps to ``-2^(b-1)``
  exactly (the scale takes the sign needed for that), so all ``2^b`` codes are used; codes are stored
  unsigned with a fixed zero point ``2^(b-1)``.
* Asymmetric: ``scale = (wmax - wmin) / (2^b - 1)``, ``zero = round(-wmin / scale)``.
* Scales are rounded to ``scale_dtype`` (fp16 by default) *inside* the fake quantizer too, so what
  tuning optimises is bit-for-bit what the packed checkpoint will dequantize to.

Codes are unsigned integers in ``[0, 2^b - 1]`` and ``w ≈ scale * (code - zero)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schemes import LayerSpec

SCALE_EPS = 1e-5  # smallest |scale| allowed, as the reference's q_scale_thresh


@dataclass
class QuantizedTensor:
    """A quantized weight: unsigned codes, per-group scales and zero points, and how it was quantized.

    ``codes``: uint8 ``[out, in]``; ``scales``: ``scale_dtype`` ``[out, G]``; ``zeros``: int32 ``[out, G]``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: LayerSpec

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


def effective_group_size(group_size: int, in_features: int) -> int:
    """Group length along the input dimension (``-1`` = the whole row)."""
    return in_features if group_size in (-1, 0) else group_size


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, G, gs]``; raises if ``in`` is not a multiple of the group size."""
    out_features, in_features = w.shape
    gs = effective_group_size(group_size, in_features)
    if in_features % gs:
        raise ValueError(f"in_features={in_features} is not divisible by group_size={gs}")
    return w.reshape(out_features, in_features // gs, gs)


def group_min_max(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group range ``[out, G]``, widened to include 0."""
    return wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def _clamp_scale(scale: torch.Tensor) -> torch.Tensor:
    """Keep |scale| >= SCALE_EPS with its sign (sym scales may be negative)."""
    return torch.where(scale < 0, scale.clamp(max=-SCALE_EPS), scale.clamp(min=SCALE_EPS))


def _to_scale_dtype(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round the scale to its storage dtype (differentiable: the cast passes gradients straight through)."""
    return scale.to(scale_dtype).to(scale.dtype)


def scale_and_zero(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    spec: LayerSpec,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    *,
    ste: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` from a (clipped) range; zero is a float holding an integer value.

    ``ste=True`` makes the zero point's rounding pass gradients (used by the fake quantizer).
    """
    if alpha is not None:
        wmin = wmin * alpha
    if beta is not None:
        wmax = wmax * beta
    if spec.sym:
        half = 2 ** (spec.bits - 1)
        neg_wins = (-wmin) > wmax
        max_v = torch.where(neg_wins, -wmin, -wmax)
        scale = _to_scale_dtype(_clamp_scale(max_v / half), scale_dtype)
        zero = torch.full_like(scale, float(half)).detach()
        return scale, zero
    maxq = 2**spec.bits - 1
    scale = _to_scale_dtype(((wmax - wmin) / maxq).clamp(min=SCALE_EPS), scale_dtype)
    raw_zero = -wmin / scale
    zero = _round_ste(raw_zero) if ste else torch.round(raw_zero)
    return scale, zero.clamp(0, maxq)


def fake_quant(
    w: torch.Tensor,
    spec: LayerSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Quantize-dequantize ``w`` [out, in] differentiably in ``v`` (rounding offset) and ``alpha``/``beta``.

    Rounding uses a straight-through estimator, so gradients reach ``v`` and, through the scale, the
    clipping factors.  Returns a tensor of ``w``'s shape and dtype.
    """
    return GroupedWeight.of(w, spec.group_size).fake_quant(spec, v, alpha, beta, scale_dtype)


class GroupedWeight:
    """A weight viewed as groups, with its per-group range computed once.

    Tuning calls the fake quantizer hundreds of times on the same weight; only ``v``, ``alpha`` and
    ``beta`` change, so the grouping and the min/max reductions are done here once.
    """

    def __init__(self, wg: torch.Tensor, shape: torch.Size):
        self.wg = wg
        self.shape = shape
        self.wmin, self.wmax = group_min_max(wg)

    @classmethod
    def of(cls, w: torch.Tensor, group_size: int) -> GroupedWeight:
        return cls(group_view(w, group_size), w.shape)

    def fake_quant(
        self,
        spec: LayerSpec,
        v: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` in ``out_dtype`` (default: the weight's dtype).

        Asking for the matmul's dtype here (bf16 in mixed precision) saves a separate cast of the
        full weight, forward and backward.
        """
        scale, zero = scale_and_zero(self.wmin, self.wmax, spec, alpha, beta, scale_dtype, ste=True)
        v = torch.zeros_like(self.wg) if v is None else v.reshape(self.wg.shape)
        out_dtype = self.wg.dtype if out_dtype is None else out_dtype
        qdq = _GroupQDQ.apply(self.wg, v, scale.unsqueeze(-1), zero.unsqueeze(-1), 2**spec.bits - 1, out_dtype)
        return qdq.reshape(self.shape)


def _group_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1, keepdim=True)`` for ``[out, G, gs]`` tensors in one pass, without the product tensor."""
    return torch.einsum("ogk,ogk->og", a, b).unsqueeze(-1)


class _GroupQDQ(torch.autograd.Function):
    """``clamp(round(w/s + v), -z, maxq - z) * s`` with its straight-through gradient, fused.

    This equals ``(clamp(round(w/s + v) + z, 0, maxq) - z) * s`` because ``z`` holds an integer value.
    Autograd through the composed elementwise chain costs a dozen full-size passes per call; tuning calls
    it for every layer at every step, so forward and backward are written out here (same values and
    gradients as the composed ops: round passes gradients straight through, clamp stops them outside
    the range).  With ``q`` the clamped integer and ``m`` the not-clipped mask:
      d/dv = s * m        d/ds = sum_group g * (q - m * w / s)        d/dz = sum_group g * (m - 1) * s
    """

    @staticmethod
    def forward(ctx, wg, v, scale, zero, maxq, out_dtype):  # type: ignore[override]
        # Clamping against scalar bounds is much faster on CPU than against per-group tensor bounds.
        pre = torch.addcdiv(v, wg, scale).round_().add_(zero)
        q = pre.clamp(0, maxq)
        inside = q == pre  # not clipped
        q.sub_(zero)
        ctx.save_for_backward(wg, scale, q, inside)
        out = torch.empty(wg.shape, dtype=out_dtype, device=wg.device)
        return torch.mul(q, scale, out=out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        wg, scale, q, inside = ctx.saved_tensors
        grad = grad.to(q.dtype)
        g_in = grad * inside
        grad_v = g_in * scale if ctx.needs_input_grad[1] else None
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[2]:
            grad_scale = _group_dot(grad, q) - _group_dot(g_in, wg) / scale
        if ctx.needs_input_grad[3]:
            grad_zero = (g_in.sum(-1, keepdim=True) - grad.sum(-1, keepdim=True)) * scale
        return None, grad_v, grad_scale, grad_zero, None, None


@torch.no_grad()
def quantize(
    w: torch.Tensor,
    spec: LayerSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Integer codes, scales and zeros for ``w`` — exactly the values ``fake_quant`` uses."""
    w = w.float()
    wg = group_view(w, spec.group_size)
    wmin, wmax = group_min_max(wg)
    scale, zero = scale_and_zero(wmin, wmax, spec, alpha, beta, scale_dtype)
    x = wg / scale.unsqueeze(-1)
    if v is not None:
        x = x + group_view(v.float(), spec.group_size)
    maxq = 2**spec.bits - 1
    codes = (torch.round(x) + zero.unsqueeze(-1)).clamp(0, maxq)
    return QuantizedTensor(
        codes=codes.reshape(w.shape).to(torch.uint8),
        scales=scale.to(scale_dtype),
        zeros=zero.to(torch.int32),
        spec=spec,
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * (code - zero)`` per group, as a dense ``[out, in]`` tensor of ``dtype``."""
    out_features, in_features = qt.codes.shape
    gs = effective_group_size(qt.spec.group_size, in_features)
    codes = qt.codes.reshape(out_features, in_features // gs, gs).to(dtype)
    w = (codes - qt.zeros.to(dtype).unsqueeze(-1)) * qt.scales.to(dtype).unsqueeze(-1)
    return w.reshape(out_features, in_features)
