"""The integer fake quantizer's elementwise passes, fused by torch.compile (Inductor) into one kernel each.

Eagerly, a tuning step's quantize-dequantize of a layer is some twenty full-size passes over its weights
(divide, round, clamp, cast, multiply forward; masks, products, sums and the signed step backward), each
reading and writing memory: on a CPU with fast matrix units they cost more than the block's matmuls.  Fused,
each direction is one pass.  The fused kernels compute the same values as the eager code of
:mod:`signround.quant.int` (the same operations in the same order: codes and dequantized weights are bit-identical,
tested), except that the per-group sums of the clipping gradients may round differently in their last bits.

Compiling costs seconds per new shape (Inductor caches kernels on disk across processes), so the path is off
unless a caller turns it on for a stretch of work (:func:`allowed`: the tuning loop, where compiling is on), and
only layers of at least :data:`MIN_ELEMENTS` weights take it.  Where compiling fails (no C++ compiler for
Inductor's CPU backend, an unsupported device) the reason is logged once and the eager code runs from then on.
``SIGNROUND_EAGER_QUANT=1`` turns the fused path off for good.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 18  # layers of fewer weights stay eager: a compile would cost more than it saves
_disabled: str | None = "SIGNROUND_EAGER_QUANT=1" if os.environ.get("SIGNROUND_EAGER_QUANT") == "1" else None
_allowed = False
# Inductor's CPU code generator warns when one kernel reads bf16 weights and fp16 scales (the stored scale
# dtype); all are widened to float32 before any arithmetic here, so the mix is intended and the warning would
# only alarm users.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node", category=UserWarning)


@contextmanager
def allowed(flag: bool = True) -> Iterator[None]:
    """Within this context large layers take the fused path (when ``flag``); restored on exit."""
    global _allowed
    before, _allowed = _allowed, flag
    try:
        yield
    finally:
        _allowed = before


def _forward(wg, v, scale, zero, weight, marked, maxq: int) -> None:
    """``weight = (clamp(round(w / s + v) + z, 0, maxq) - z) * s`` in ``weight``'s dtype and the marked codes
    (``round(w / s + v) + z`` clamped to ``[-1, maxq + 1]``) in ``marked``; ``w`` widened to float32."""
    pre = torch.addcdiv(v, wg.float(), scale).round_().add_(zero)
    marked.copy_(pre.clamp(-1, maxq + 1))
    weight.copy_((pre.clamp(0, maxq) - zero) * scale)


def _dequantize(marked, zero, scale, weight, maxq: int) -> None:
    """``weight = (clamp(codes, 0, maxq) - z) * s`` from marked codes, rounded once to ``weight``'s dtype."""
    weight.copy_((marked.clamp(0, maxq).float() - zero.float()) * scale.float())


def _grads(g, wg, scale, zero, marked, maxq: int):
    """Per-group gradients of scale and zero and the per-weight gradient of ``v`` (see ``quant.int._GroupQDQ``)."""
    g = g.float()
    inside = (marked >= 0) & (marked <= maxq)
    g_in = g * inside
    grad_scale = (g * (marked.clamp(0, maxq).float() - zero)).sum(-1, keepdim=True)
    grad_scale = grad_scale - (g_in * wg.float()).sum(-1, keepdim=True) / scale
    grad_zero = (g_in.sum(-1, keepdim=True) - g.sum(-1, keepdim=True)) * scale
    return g_in * scale, grad_scale, grad_zero


def _grads_and_step(g, wg, scale, zero, marked, v, lr, maxq: int):
    """:func:`_grads` with ``v``'s signed step applied in place (``v -= lr * sign(grad_v)``, clamped to
    ``[-0.5, 0.5]``) instead of returning its gradient."""
    grad_v, grad_scale, grad_zero = _grads(g, wg, scale, zero, marked, maxq)
    v.copy_((v - lr * torch.sign(grad_v)).clamp(-0.5, 0.5))
    return grad_scale, grad_zero


_compiled: dict[str, Callable[..., Any]] = {}


# Inductor keeps intermediates in float32 and would drop a float32 -> float16 -> float32 round trip inside a
# kernel; the scale's rounding to its stored dtype is exactly such a trip, so these kernels emulate the casts.
_EMULATE_CASTS = {"sym_scale", "sym_scale_grads"}


def _kernel(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in _compiled:
        options = {"emulate_precision_casts": True} if name in _EMULATE_CASTS else None
        _compiled[name] = torch.compile(fn, dynamic=None, options=options)
    return _compiled[name]


def applies(wg: torch.Tensor) -> bool:
    """Whether the fused path is taken for this grouped weight."""
    return _allowed and _disabled is None and wg.numel() >= MIN_ELEMENTS


def first_line(exc: BaseException) -> str:
    """``"Type: first line of the message"``: an exception named in one log line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` compiled; None where compiling is off or has failed (logged once; eager from then on)."""
    global _disabled
    if _disabled is not None:
        return None
    try:
        result = _kernel(name, fn)(*args)
    except Exception as exc:  # Inductor without a compiler, an unsupported device: the eager code is exact
        _disabled = first_line(exc)
        logger.warning("fused fake-quant kernels unavailable (%s); the eager ones run instead", _disabled)
        return None
    return True if result is None else result


def forward(wg, v, scale, zero, weight, marked, maxq: int) -> bool:
    """Fill ``weight`` and ``marked`` (see :func:`_forward`); False where the caller must run the eager code."""
    return _call("forward", _forward, wg, v, scale, zero, weight, marked, maxq) is not None


def dequantize(marked, zero, scale, weight, maxq: int) -> bool:
    """Fill ``weight`` from the codes (see :func:`_dequantize`); False where the caller must run the eager code."""
    return _call("dequantize", _dequantize, marked, zero, scale, weight, maxq) is not None


def grads(g, wg, scale, zero, marked, maxq: int):
    """``(grad_v, grad_scale, grad_zero)`` of one row slice, or None (run the eager code)."""
    return _call("grads", _grads, g, wg, scale, zero, marked, maxq)


def grads_and_step(g, wg, scale, zero, marked, v, lr: float, maxq: int):
    """``(grad_scale, grad_zero)`` of one row slice with ``v``'s signed step applied, or None (run the eager
    code)."""
    return _call("grads_and_step", _grads_and_step, g, wg, scale, zero, marked, v, _lr_tensor(lr, v.device), maxq)


_lr_tensors: dict[torch.device, torch.Tensor] = {}


def _lr_tensor(lr: float, device: torch.device) -> torch.Tensor:
    """``lr`` as a 0-d float32 tensor on ``device`` (a float argument would recompile the kernel per value),
    refilled in place: a fill kernel with the value as its argument, where ``torch.tensor(lr, device=...)`` is a
    blocking host-to-device copy per layer per step on a GPU."""
    tensor = _lr_tensors.get(device)
    if tensor is None:
        tensor = _lr_tensors[device] = torch.empty((), dtype=torch.float32, device=device)
    return tensor.fill_(lr)


def sym_scale(wmin, wmax, alpha, beta, half: int, scale_dtype: torch.dtype):
    """The symmetric scale from the clipping factors (``quant.int._sym_scale``), or None (run the eager code)."""
    from .int import _sym_scale

    return _call("sym_scale", _sym_scale, wmin, wmax, alpha, beta, half, scale_dtype)


def sym_scale_grads(grad, wmin, wmax, alpha, beta, half: int, scale_dtype: torch.dtype):
    """``(grad_alpha, grad_beta)`` of :func:`sym_scale` (``quant.int._sym_scale_grads``), or None (eager)."""
    from .int import _sym_scale_grads

    return _call("sym_scale_grads", _sym_scale_grads, grad, wmin, wmax, alpha, beta, half, scale_dtype)
