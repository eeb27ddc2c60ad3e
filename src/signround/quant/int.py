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

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..schemes import LayerSpec
from . import fused

GradSink = Callable[[slice, torch.Tensor], None]  # (grouped row slice, its gradient), see GroupedWeight.linear


class SignStep:
    """The grad sink of SignRound's ``v``: ``v[rows] <- clamp(v[rows] - lr * sign(grad), -0.5, 0.5)`` as each row
    slice's gradient is computed (the fused backward applies it inside its kernel).  ``v`` is grouped
    ``[out, G, gs]``; ``lr`` is read at every step (the schedule moves it)."""

    def __init__(self, v: torch.Tensor, lr: Callable[[], float]):
        self.v, self.lr = v, lr

    @torch.no_grad()
    def __call__(self, rows: slice, grad: torch.Tensor) -> None:
        self.v[rows].add_(grad.sign_(), alpha=-self.lr()).clamp_(-0.5, 0.5)


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
        scale = _sym_scale_of_range(wmin, wmax, half, scale_dtype)
        return scale, _sym_zero(scale, half)
    maxq = 2**spec.bits - 1
    scale = _to_scale_dtype(((wmax - wmin) / maxq).clamp(min=SCALE_EPS), scale_dtype)
    raw_zero = -wmin / scale
    zero = _round_ste(raw_zero) if ste else torch.round(raw_zero)
    return scale, zero.clamp(0, maxq)


def _sym_scale_of_range(lo: torch.Tensor, hi: torch.Tensor, half: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """The full-range symmetric scale of a (clipped) range: the larger side maps to ``-half`` exactly."""
    neg_wins = (-lo) > hi
    return _to_scale_dtype(_clamp_scale(torch.where(neg_wins, -lo, -hi) / half), scale_dtype)


def _sym_zero(scale: torch.Tensor, half: int) -> torch.Tensor:
    """The symmetric grid's fixed zero point (no gradient)."""
    return torch.full_like(scale, float(half)).detach()


def _sym_scale(wmin, wmax, alpha, beta, half: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """``scale_and_zero``'s symmetric scale with both clipping factors (the fused path compiles this function)."""
    return _sym_scale_of_range(wmin * alpha, wmax * beta, half, scale_dtype)


def _sym_scale_grads(grad, wmin, wmax, alpha, beta, half: int, scale_dtype: torch.dtype):
    """The gradients of ``alpha`` and ``beta`` that autograd computes through :func:`_sym_scale`: the cast's
    straight-through gradient (rounded to the scale dtype and back), each clamp's pass-through mask, the division,
    the selection of the larger side, its negation and the product with the range."""
    a, b = wmin * alpha, wmax * beta
    neg_wins = (-a) > b
    s0 = torch.where(neg_wins, -a, -b) / half
    g = grad.to(scale_dtype).to(grad.dtype)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    g = torch.where(s0 < 0, torch.where(s0 <= -SCALE_EPS, g, zero), torch.where(s0 >= SCALE_EPS, g, zero)) / half
    return -torch.where(neg_wins, g, zero) * wmin, -torch.where(neg_wins, zero, g) * wmax


class _SymClipScale(torch.autograd.Function):
    """The symmetric per-group scale from the clipping factors ``alpha`` / ``beta``, with its backward written out.

    Composed, autograd records some fifteen small ops per layer and step and as many backward, each a kernel
    launch on a GPU (where the tuning loop is bound by launches: docs/benchmarks.md, the H200 profile).  Here each
    direction is one compiled kernel on the fused path and the same eager ops otherwise, with the values and
    gradients of the composed ops."""

    @staticmethod
    def forward(ctx, wmin, wmax, alpha, beta, half: int, scale_dtype: torch.dtype, use_fused: bool):
        ctx.save_for_backward(wmin, wmax, alpha, beta)
        ctx.half, ctx.scale_dtype, ctx.use_fused = half, scale_dtype, use_fused
        args = (wmin, wmax, alpha.detach(), beta.detach(), half, scale_dtype)
        found = fused.sym_scale(*args) if use_fused else None
        return found if found is not None else _sym_scale(*args)

    @staticmethod
    def backward(ctx, grad):
        wmin, wmax, alpha, beta = ctx.saved_tensors
        args = (grad, wmin, wmax, alpha, beta, ctx.half, ctx.scale_dtype)
        found = fused.sym_scale_grads(*args) if ctx.use_fused else None
        grad_alpha, grad_beta = found if found is not None else _sym_scale_grads(*args)
        return None, None, grad_alpha, grad_beta, None, None, None


def tuning_scale_and_zero(
    wmin: torch.Tensor,
    wmax: torch.Tensor,
    spec: LayerSpec,
    alpha: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale_dtype: torch.dtype,
    use_fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scale_and_zero` for the fake quantizer (``ste=True``): the symmetric grid with both clipping factors
    through :class:`_SymClipScale` (one op each way), every other case composed."""
    if not spec.sym or alpha is None or beta is None:
        return scale_and_zero(wmin, wmax, spec, alpha, beta, scale_dtype, ste=True)
    half = 2 ** (spec.bits - 1)
    scale = _SymClipScale.apply(wmin, wmax, alpha, beta, half, scale_dtype, use_fused)
    return scale, _sym_zero(scale, half)


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
    return GroupedWeight.of(w, spec.group_size).fake_quant(spec, v, alpha, beta, scale_dtype)[0]


class GroupedWeight:
    """A weight viewed as groups, with its per-group range computed once.

    Tuning calls the fake quantizer hundreds of times on the same weight; only ``v``, ``alpha`` and
    ``beta`` change, so the grouping and the min/max reductions are done here once.  The weight is kept in
    its own dtype (a bf16 checkpoint's tensor, not a float32 copy): widening bf16 / fp16 to float32 is exact,
    so the arithmetic, done in float32 on the fly, is the same and the weight costs half the memory.
    """

    def __init__(self, wg: torch.Tensor, shape: torch.Size):
        self.wg = wg
        self.shape = shape
        wmin, wmax = group_min_max(wg)
        self.wmin, self.wmax = wmin.float(), wmax.float()

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
    ) -> tuple[torch.Tensor, RoundedGroups]:
        """The dequantized weight ``[out, in]`` in ``out_dtype`` (default: the weight's dtype), and the integer
        codes it used (no extra memory: the backward keeps them anyway), so that a caller can keep exactly the
        quantization it measured.  Asking for the matmul's dtype here (bf16 in mixed precision) saves a separate
        cast of the full weight, forward and backward."""
        scale, zero = tuning_scale_and_zero(
            self.wmin, self.wmax, spec, alpha, beta, scale_dtype, fused.applies(self.wg)
        )
        v = torch.zeros(self.wg.shape, device=self.wg.device) if v is None else v.reshape(self.wg.shape)
        out_dtype = self.wg.dtype if out_dtype is None else out_dtype
        maxq = 2**spec.bits - 1
        qdq, codes = _GroupQDQ.apply(self.wg, v, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq, out_dtype)
        rounded = RoundedGroups(codes, scale.detach(), zero.detach(), spec, self.shape)
        return qdq.reshape(self.shape), rounded

    def linear(
        self,
        x: torch.Tensor,
        spec: LayerSpec,
        v: torch.Tensor,
        alpha: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
        bias: torch.Tensor | None = None,
        grad_v_sink: GradSink | None = None,
        workspace: Workspace | None = None,
    ) -> tuple[torch.Tensor, RoundedGroups]:
        """``F.linear(x, fake_quant(...) in x's dtype, bias)`` and the codes used, for tuning: the backward
        recomputes the quantized weight from the codes rather than keeping it (see ``_QDQLinear``).

        ``grad_v_sink(rows, grad)``: the backward hands ``v``'s gradient to it one grouped row slice at a time
        (e.g. to step ``v`` at once) instead of returning it, so no weight-sized gradient of ``v`` ever exists.
        ``workspace``: buffers reused across steps (the codes returned are then one of its buffers)."""
        scale, zero = tuning_scale_and_zero(
            self.wmin, self.wmax, spec, alpha, beta, scale_dtype, fused.applies(self.wg)
        )
        maxq = 2**spec.bits - 1
        out, codes = _QDQLinear.apply(
            x, self.wg, v.reshape(self.wg.shape), scale.unsqueeze(-1), zero.unsqueeze(-1), bias, maxq, self.shape,
            grad_v_sink, workspace,
        )  # fmt: skip
        return out, RoundedGroups(codes, scale.detach(), zero.detach(), spec, self.shape)


def marked_code_dtype(bits: int) -> torch.dtype:
    """Smallest integer dtype holding ``-1 .. 2^bits`` (codes with the clipped ends marked)."""
    return torch.int8 if bits <= 6 else torch.int16


@dataclass
class RoundedGroups:
    """The fake quantizer's integer result: codes in ``[-1, 2^b]`` per ``[out, G, gs]`` element, where ``-1`` and
    ``2^b`` mark a value clipped below 0 / above ``2^b - 1`` (they stand for code 0 / ``2^b - 1``), with the
    per-group float32 ``scale`` (already rounded to the scale dtype) and integer-valued ``zero``.

    One byte per weight for up to 6 bits keeps both what the backward needs (the code and whether it was
    clipped) and what the packed checkpoint needs."""

    marked_codes: torch.Tensor
    scale: torch.Tensor  # [out, G]
    zero: torch.Tensor  # [out, G]
    spec: LayerSpec
    shape: torch.Size

    def quantized(self, scale_dtype: torch.dtype) -> QuantizedTensor:
        """The packed form: exactly the values this fake quantization computed with."""
        codes = self.marked_codes.clamp(0, 2**self.spec.bits - 1).to(torch.uint8)
        return QuantizedTensor(
            codes=codes.reshape(self.shape),
            scales=self.scale.to(scale_dtype),
            zeros=self.zero.to(torch.int32),
            spec=self.spec,
        )

    def kept(self) -> KeptCodes:
        """These codes in the smallest form that still gives :meth:`quantized` exactly: the clip marks dropped and
        ``8 // width`` codes per byte.  The tuning loop keeps its best step this way, so that its one-byte marked
        buffer goes back to the workspace at once (half a byte per weight held instead of one, for 3-4 bits)."""
        width = _code_width(self.spec.bits)
        maxq = 2**self.spec.bits - 1
        flat = self.marked_codes.reshape(-1)
        per_byte = 8 // width
        packed = torch.zeros(-(-flat.numel() // per_byte), dtype=torch.uint8, device=flat.device)
        step = CHUNK_ELEMENTS - CHUNK_ELEMENTS % per_byte
        for start in range(0, flat.numel(), step):  # a million codes at a time: no weight-sized temporary
            codes = flat[start : start + step].clamp(0, maxq).to(torch.uint8)
            target = packed[start // per_byte : start // per_byte + -(-codes.numel() // per_byte)]
            for k in range(per_byte):
                part = codes[k::per_byte]
                target[: part.numel()] |= part << (k * width)
        return KeptCodes(packed, self.scale, self.zero, self.spec, self.shape)


def _code_width(bits: int) -> int:
    """Bits per code in :class:`KeptCodes`: a power of two, so that codes never straddle a byte."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass
class KeptCodes:
    """A :class:`RoundedGroups` put aside (the best step so far): codes packed ``8 // width`` per byte."""

    packed: torch.Tensor  # uint8
    scale: torch.Tensor
    zero: torch.Tensor
    spec: LayerSpec
    shape: torch.Size
    marked_codes: None = None  # nothing to hand back to the workspace

    def quantized(self, scale_dtype: torch.dtype) -> QuantizedTensor:
        """Exactly :meth:`RoundedGroups.quantized` of the codes these were kept from."""
        width = _code_width(self.spec.bits)
        per_byte = 8 // width
        numel = self.shape.numel()
        codes = torch.empty(self.packed.numel() * per_byte, dtype=torch.uint8, device=self.packed.device)
        mask = (1 << width) - 1
        for k in range(per_byte):
            torch.bitwise_and(self.packed >> (k * width), mask, out=codes[k::per_byte])
        return QuantizedTensor(
            codes=codes[:numel].reshape(self.shape),
            scales=self.scale.to(scale_dtype),
            zeros=self.zero.to(torch.int32),
            spec=self.spec,
        )


def _group_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1, keepdim=True)`` for ``[out, G, gs]`` tensors in one pass, without the product tensor."""
    return torch.einsum("ogk,ogk->og", a, b).unsqueeze(-1)


CHUNK_ELEMENTS = 1 << 20  # elementwise passes run over about a million weights at a time


class Workspace:
    """Buffers reused across the steps of one block's tuning, so that the allocator is not asked for (and does
    not fragment its heap with) weight-sized blocks at every layer of every step:

    * ``dense``: the dense quantized weight a layer's matmul needs, forward and backward; layers run one at a
      time, so one buffer per dtype and device, as large as the largest layer, serves them all;
    * ``codes``: buffers for the marked codes of a forward, handed back with ``recycle`` by the caller that
      knows when they are no longer used (after the backward, and not kept as the best step's).
    """

    def __init__(self) -> None:
        self._dense: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._codes: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}

    def dense(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape.numel()
        buffer = self._dense.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = self._dense[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def codes(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._codes.get((tuple(shape), dtype, device))
        return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)

    def recycle(self, codes: torch.Tensor) -> None:
        self._codes.setdefault((tuple(codes.shape), codes.dtype, codes.device), []).append(codes)


def _row_slices(wg: torch.Tensor) -> list[slice]:
    """Output-row slices of a grouped weight ``[out, G, gs]`` of about ``CHUNK_ELEMENTS`` each: the float32
    temporaries of the fake quantizer stay a few MB instead of several copies of the largest layer."""
    rows = max(1, CHUNK_ELEMENTS // (wg.shape[1] * wg.shape[2]))
    return [slice(start, start + rows) for start in range(0, wg.shape[0], rows)]


def _unclamped_codes(wg: torch.Tensor, v: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``round(w / s + v) + z`` in float32, before clamping to the grid: the one definition of the rounding, used by
    the fake quantizer and by ``quantize`` alike (never in place on ``wg``, which may be the caller's weight).
    Callers clamp against scalar bounds, much faster on CPU than against per-group tensor bounds."""
    x = torch.div(wg, scale) if v is None else torch.addcdiv(v, wg, scale)
    return x.round_().add_(zero)


def _dequantize_groups(
    codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, maxq: int, out: torch.Tensor
) -> torch.Tensor:
    """``(clamp(codes, 0, maxq) - zero) * scale`` computed in float32 and rounded once to ``out``'s dtype, a row
    slice at a time (grouped ``[out, G, gs]`` codes; ``zero`` / ``scale`` ``[out, G, 1]``)."""
    if fused.applies(codes) and fused.dequantize(codes, zero, scale, out, maxq):
        return out
    for rows in _row_slices(codes):
        q = codes[rows].clamp(0, maxq).float().sub_(zero[rows].float())
        torch.mul(q, scale[rows].float(), out=out[rows])
    return out


def _qdq_forward(
    wg: torch.Tensor,
    v: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    out_dtype: torch.dtype,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dequantized weight in out_dtype, marked codes)``, both grouped ``[out, G, gs]`` (with ``workspace``: in
    its buffers, the weight in the shared one)."""
    code_dtype = marked_code_dtype(maxq.bit_length())
    if workspace is None:
        weight = torch.empty(wg.shape, dtype=out_dtype, device=wg.device)
        marked = torch.empty(wg.shape, dtype=code_dtype, device=wg.device)
    else:
        weight = workspace.dense(wg.shape, out_dtype, wg.device)
        marked = workspace.codes(wg.shape, code_dtype, wg.device)
    if fused.applies(wg) and fused.forward(wg, v, scale, zero, weight, marked, maxq):
        return weight, marked
    for rows in _row_slices(wg):
        pre = _unclamped_codes(wg[rows], v[rows], scale[rows], zero[rows])
        marked[rows] = pre.clamp(-1, maxq + 1)
        torch.mul(pre.clamp_(0, maxq).sub_(zero[rows]), scale[rows], out=weight[rows])
    return weight, marked


def _qdq_weight(
    marked: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    maxq: int,
    dtype: torch.dtype,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """The dequantized grouped weight in ``dtype`` from the marked codes (the values ``_qdq_forward`` gave)."""
    if workspace is None:
        weight = torch.empty(marked.shape, dtype=dtype, device=marked.device)
    else:
        weight = workspace.dense(marked.shape, dtype, marked.device)
    return _dequantize_groups(marked, zero, scale, maxq, weight)


def _qdq_backward(
    grad_rows: Callable[[slice], torch.Tensor],
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    marked: torch.Tensor,
    maxq: int,
    needs: tuple[bool, bool, bool],
    grad_v_sink: GradSink | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``v``, ``scale`` and ``zero`` (those ``needs`` asks for), given the grouped weight's gradient
    one row slice at a time (``grad_rows``: it may be computed per slice too).  With ``grad_v_sink`` ``v``'s
    gradient goes there slice by slice and None is returned for it."""
    need_v, need_scale, need_zero = needs
    grad_v = torch.empty(wg.shape, dtype=torch.float32, device=wg.device) if need_v and not grad_v_sink else None
    grad_scale = torch.empty_like(scale) if need_scale else None
    grad_zero = torch.empty_like(scale) if need_zero else None
    use_fused = fused.applies(wg)
    for rows in _row_slices(wg):
        g = grad_rows(rows)
        if use_fused:  # one compiled pass per slice; the eager passes below where it cannot run
            args = (g, wg[rows], scale[rows], zero[rows], marked[rows])
            if isinstance(grad_v_sink, SignStep):  # v's step inside the kernel
                found = fused.grads_and_step(*args, grad_v_sink.v[rows], grad_v_sink.lr(), maxq)
                found = None if found is None else (None, *found)
            else:
                found = fused.grads(*args, maxq)
            if found is not None:
                slice_v, slice_scale, slice_zero = found
                if need_scale:
                    grad_scale[rows] = slice_scale
                if need_zero:
                    grad_zero[rows] = slice_zero
                if slice_v is not None and grad_v_sink is not None:
                    grad_v_sink(rows, slice_v)
                elif slice_v is not None and need_v:
                    grad_v[rows] = slice_v
                continue
        g = g.float()
        codes = marked[rows]
        inside = (codes >= 0) & (codes <= maxq)
        if need_scale:
            grad_scale[rows] = _group_dot(g, codes.clamp(0, maxq).float().sub_(zero[rows]))
        g_in = g * inside
        if need_zero:
            grad_zero[rows] = (g_in.sum(-1, keepdim=True) - g.sum(-1, keepdim=True)) * scale[rows]
        if need_scale:
            grad_scale[rows] -= _group_dot(g_in, wg[rows].float()) / scale[rows]
        if grad_v_sink is not None:
            grad_v_sink(rows, g_in.mul_(scale[rows]))
        elif need_v:
            torch.mul(g_in, scale[rows], out=grad_v[rows])
    return grad_v, grad_scale, grad_zero


class _GroupQDQ(torch.autograd.Function):
    """``clamp(round(w/s + v), -z, maxq - z) * s`` with its straight-through gradient, fused.

    This equals ``(clamp(round(w/s + v) + z, 0, maxq) - z) * s`` because ``z`` holds an integer value.
    Autograd through the composed elementwise chain costs a dozen full-size passes per call; tuning calls
    it for every layer at every step, so forward and backward are written out here (same values and
    gradients as the composed ops: round passes gradients straight through, clamp stops them outside
    the range).  With ``q`` the clamped integer and ``m`` the not-clipped mask:
      d/dv = s * m        d/ds = sum_group g * (q - m * w / s)        d/dz = sum_group g * (m - 1) * s
    What is kept for the backward is the weight as stored and one small integer per weight: the code
    ``round(w/s + v) + z`` clamped to ``[-1, maxq + 1]``, so that the ends outside ``[0, maxq]`` mark ``m = 0``.
    It is also returned (not differentiable), as the codes the caller may keep.
    """

    @staticmethod
    def forward(ctx, wg, v, scale, zero, maxq, out_dtype):  # type: ignore[override]
        weight, marked = _qdq_forward(wg, v, scale, zero, maxq, out_dtype)
        ctx.save_for_backward(wg, scale, zero, marked)
        ctx.maxq = maxq
        ctx.mark_non_differentiable(marked)
        return weight, marked

    @staticmethod
    def backward(ctx, grad, _grad_marked):  # type: ignore[override]
        wg, scale, zero, marked = ctx.saved_tensors
        grads = _qdq_backward(grad.__getitem__, wg, scale, zero, marked, ctx.maxq, ctx.needs_input_grad[1:4])
        return None, *grads, None, None


class _QDQLinear(torch.autograd.Function):
    """``x @ qdq(W)^T + b`` where the backward recomputes ``qdq(W)`` from the one-byte codes instead of keeping
    it: between a block's forward and its backward each layer holds its input, its weight as stored and the
    codes, not also a dense copy of the quantized weight (2 bytes per weight in bf16, 4 in float32; one
    elementwise pass more per backward, next to three matmuls).  The weight's gradient is computed one row
    slice at a time and consumed at once."""

    @staticmethod
    def forward(ctx, x, wg, v, scale, zero, bias, maxq, shape, grad_v_sink, workspace):  # type: ignore[override]
        weight, marked = _qdq_forward(wg, v, scale, zero, maxq, x.dtype, workspace)
        out = torch.nn.functional.linear(x, weight.reshape(shape), bias)
        del weight
        ctx.save_for_backward(x, wg, scale, zero, marked)
        ctx.maxq, ctx.shape, ctx.has_bias, ctx.grad_v_sink = maxq, shape, bias is not None, grad_v_sink
        ctx.workspace = workspace
        ctx.mark_non_differentiable(marked)
        return out, marked

    @staticmethod
    def backward(ctx, grad_out, _grad_marked):  # type: ignore[override]
        x, wg, scale, zero, marked = ctx.saved_tensors
        need_x, _need_w, need_v, need_scale, need_zero, need_bias = ctx.needs_input_grad[:6]
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        x_flat = x.reshape(-1, x.shape[-1])
        grad_x = grad_bias = None
        if need_x:
            weight = _qdq_weight(marked, scale, zero, ctx.maxq, x.dtype, ctx.workspace).reshape(ctx.shape)
            grad_x = grad_out.matmul(weight)
            del weight
        if need_bias and ctx.has_bias:
            grad_bias = grad_flat.sum(0)

        def grad_w(rows: slice) -> torch.Tensor:
            return grad_flat[:, rows].t().mm(x_flat).reshape(-1, *wg.shape[1:])

        needs = (need_v, need_scale, need_zero)
        grads = _qdq_backward(grad_w, wg, scale, zero, marked, ctx.maxq, needs, ctx.grad_v_sink)
        return grad_x, None, *grads, grad_bias, None, None, None, None


@torch.no_grad()
def quantize(
    w: torch.Tensor,
    spec: LayerSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedTensor:
    """Integer codes, scales and zeros for ``w`` — exactly the values ``fake_quant`` uses (in float32, a row
    slice at a time: no float32 copy of the whole weight)."""
    gw = GroupedWeight.of(w, spec.group_size)
    scale, zero = scale_and_zero(gw.wmin, gw.wmax, spec, alpha, beta, scale_dtype)
    vg = None if v is None else group_view(v.float(), spec.group_size)
    maxq = 2**spec.bits - 1
    codes = torch.empty(gw.wg.shape, dtype=torch.uint8, device=w.device)
    scale_g, zero_g = scale.unsqueeze(-1), zero.unsqueeze(-1)
    for rows in _row_slices(gw.wg):
        v_rows = None if vg is None else vg[rows]
        codes[rows] = _unclamped_codes(gw.wg[rows], v_rows, scale_g[rows], zero_g[rows]).clamp_(0, maxq)
    return QuantizedTensor(
        codes=codes.reshape(w.shape),
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


def dequantize_rounded_once(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize(qt, float32).to(dtype)`` — computed in float32, rounded once to ``dtype``: what the fake
    quantizer hands a ``dtype`` matmul — a row slice at a time, without the float32 copy of the whole weight."""
    out_features, in_features = qt.codes.shape
    gs = effective_group_size(qt.spec.group_size, in_features)
    codes = qt.codes.reshape(out_features, in_features // gs, gs)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    maxq = 2**qt.spec.bits - 1  # the codes are in range already: the clamp changes nothing
    _dequantize_groups(codes, qt.zeros.unsqueeze(-1), qt.scales.unsqueeze(-1), maxq, out)
    return out.reshape(out_features, in_features)
