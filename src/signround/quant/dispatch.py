"""Which quantization arithmetic a ``LayerSpec`` names, behind one set of calls.

Tuning and packing hold a layer's result without caring which grid made it: the integer grids of
:mod:`~signround.quant.int` (``data_type="int"``) or llama.cpp's GGUF blocks of :mod:`~signround.quant.gguf`
(``data_type="gguf:q4_k"``, ...).  These functions pick the module from the spec (or the result's type); nothing
else branches on ``data_type``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..schemes import LayerSpec, fp_format_of, gguf_type_of
from . import fp_tensor, gguf
from .gguf_tunable import search_range, to_gguf
from .int import QuantizedTensor, dequantize_rounded_once
from .int import quantize as quantize_int

Quantized = QuantizedTensor | gguf.GGUFQuantized | fp_tensor.FPTensor


def is_gguf(spec: LayerSpec) -> bool:
    return gguf_type_of(spec.data_type) is not None


def is_fp(spec: LayerSpec) -> bool:
    """Floating-point grids (MX, NVFP4, FP8): :mod:`~signround.quant.fp_tensor`."""
    return fp_format_of(spec) is not None


def quantize_weight(
    w: torch.Tensor,
    spec: LayerSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.float16,
    *,
    importance: torch.Tensor | None = None,
) -> Quantized:
    """``w`` quantized as ``spec`` says, with a rounding offset ``v`` and range factors ``alpha`` / ``beta``.

    GGUF types: without ``v`` / ``alpha`` / ``beta`` this is llama.cpp's own quantizer, byte for byte (what
    ``llama-quantize`` writes without an importance matrix); with them, the same search's range shrunk by
    ``alpha`` / ``beta`` and rounded with ``v`` (:mod:`~signround.quant.gguf_tunable`).  ``scale_dtype`` is the
    integer grids' (GGUF stores fp16 scales by definition).  ``importance`` (GGUF types only, float
    ``[in_features]``, the inputs' mean ``x^2`` per column): llama.cpp's importance-matrix quantizer instead,
    byte for byte ``llama-quantize --imatrix``'s, and its search's range for ``alpha`` / ``beta``.
    """
    if is_fp(spec):  # scales are the format's own (E8M0, E4M3, float32): scale_dtype does not apply
        return fp_tensor.quantize(w, spec, v, alpha, beta)
    t = gguf_type_of(spec.data_type)
    if t is None:
        return quantize_int(w, spec, v, alpha, beta, scale_dtype)
    w = w.detach()
    if v is None and alpha is None and beta is None:
        return gguf.quantize(w, t.name, importance)
    lo, hi = search_range(w, t.name, importance)
    return to_gguf(w, t.name, lo, hi, alpha, beta, v, importance=importance)


def dequantize_weight(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """The weight a quantized layer computes with, in ``dtype`` (computed in float32, rounded once)."""
    if isinstance(q, gguf.GGUFQuantized):
        return gguf.dequantize(q).to(dtype)
    if isinstance(q, fp_tensor.FPTensor):
        return fp_tensor.dequantize(q, dtype)
    return dequantize_rounded_once(q, dtype)


def _gguf_tensors(q: gguf.GGUFQuantized) -> dict[str, torch.Tensor]:
    """The stored tensors of a GGUF result by field name (the fields its type has)."""
    return {f.name: t for f in dataclasses.fields(q) if isinstance(t := getattr(q, f.name), torch.Tensor)}


def moved(q: Quantized, device: torch.device) -> Quantized:
    """The same result with every tensor on ``device``."""
    if isinstance(q, gguf.GGUFQuantized):
        return dataclasses.replace(q, **{name: t.to(device) for name, t in _gguf_tensors(q).items()})
    if isinstance(q, fp_tensor.FPTensor):
        return q.moved(device)
    return QuantizedTensor(q.codes.to(device), q.scales.to(device), q.zeros.to(device), q.spec)


def to_tensors(q: Quantized) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """A result as named tensors (relative names) plus a JSON description, to keep it on disk (resume)."""
    if isinstance(q, gguf.GGUFQuantized):
        return _gguf_tensors(q), {"gguf": q.type_name, "shape": list(q.shape)}
    if isinstance(q, fp_tensor.FPTensor):
        return fp_tensor.to_tensors(q)
    return {"codes": q.codes, "scales": q.scales, "zeros": q.zeros}, q.spec.to_dict()


def from_tensors(tensors: dict[str, torch.Tensor], description: dict[str, object]) -> Quantized:
    """Inverse of :func:`to_tensors`."""
    if "gguf" in description:
        return gguf.GGUFQuantized(str(description["gguf"]), tuple(description["shape"]), **tensors)  # type: ignore[arg-type]
    if "fp" in description:
        return fp_tensor.from_tensors(tensors, description)
    return QuantizedTensor(tensors["codes"], tensors["scales"], tensors["zeros"], LayerSpec(**description))
