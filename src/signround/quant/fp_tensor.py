"""A layer quantized to a floating-point grid, with the ``LayerSpec`` that named it and its calibrated input scale.

:mod:`~signround.quant.fp` is the format math on bare tensors; this module maps a spec (``data_type`` ``"mx_fp"``,
``"nv_fp"``, ``"fp"`` and the ``act_*`` fields, :data:`signround.schemes.FP_WEIGHT_FORMATS` /
:data:`~signround.schemes.FP_ACT_FORMATS`) onto it, so tuning, packing and kernels hold one result type:

* the weight: codes and scales exactly as a checkpoint stores them (:class:`~signround.quant.fp.FPQuantized`);
* ``input_scale`` (float32 ``[1]``), only for schemes whose activation scale is calibrated rather than taken from
  each input: FP8_STATIC's per-tensor ``amax / 448`` and NVFP4's global ``448 * 6 / amax``
  (:func:`~signround.quant.fp.input_scale`).  Dynamic activation schemes (MX, FP8_BLOCK) need none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..schemes import LayerSpec, act_quant_of, fp_format_of
from . import fp

__all__ = [
    "FPTensor",
    "calibrated_input_scale",
    "dequantize",
    "from_tensors",
    "needs_input_scale",
    "quantize",
    "quantize_input",
    "to_tensors",
    "weight_format",
    "with_input_scale",
]


@dataclass
class FPTensor:
    """One floating-point layer: ``q`` (the stored weight), ``spec``, ``input_scale`` (static activations)."""

    q: fp.FPQuantized
    spec: LayerSpec
    input_scale: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor:
        """The ``[out, in]`` element codes (``codes.shape`` / ``.device`` describe the layer, as for int results)."""
        return self.q.codes

    def moved(self, device: torch.device | str) -> FPTensor:
        q = self.q
        gs = None if q.global_scale is None else q.global_scale.to(device)
        moved_q = fp.FPQuantized(q.codes.to(device), q.scales.to(device), gs, q.fmt)
        scale = None if self.input_scale is None else self.input_scale.to(device)
        return FPTensor(moved_q, self.spec, scale)


def weight_format(spec: LayerSpec) -> fp.FPFormat:
    name = fp_format_of(spec)
    if name is None:
        raise ValueError(f"{spec} does not name a floating-point weight grid")
    return fp.fp_format(name)


def quantize(
    w: torch.Tensor,
    spec: LayerSpec,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> FPTensor:
    """``w`` in the spec's grid (``v`` / ``alpha`` / ``beta`` as :func:`signround.quant.fp.quantize`)."""
    return FPTensor(fp.quantize(w.detach(), weight_format(spec), v, alpha, beta), spec, input_scale)


def dequantize(t: FPTensor, dtype: torch.dtype) -> torch.Tensor:
    return fp.dequantize(t.q, dtype)


def needs_input_scale(spec: LayerSpec) -> bool:
    """Whether the spec's activation scale is calibrated (static) rather than taken from each input."""
    act = act_quant_of(spec)
    return act is not None and act.static


def calibrated_input_scale(spec: LayerSpec, amax: torch.Tensor | None) -> torch.Tensor | None:
    """The stored activation scale of a static-activation spec from its inputs' largest magnitude (None otherwise,
    or when no input was observed)."""
    act = act_quant_of(spec)
    if act is None or not act.static or amax is None:
        return None
    return fp.input_scale(amax, act.format)


def quantize_input(x: torch.Tensor, spec: LayerSpec, input_scale: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as the scheme quantizes it (``x`` itself for 16-bit activations).  A static scheme without
    a calibrated scale falls back to the input's own (dynamic) one: what tuning does before calibration exists."""
    act = act_quant_of(spec)
    if act is None:
        return x
    fmt = fp.fp_format(act.format)
    if not act.static or input_scale is None:
        if act.static and not fmt.has_global_scale:
            input_scale = fp.input_scale(x.detach().abs().amax(), fmt)
        else:
            return fp.fake_quant_input(x, fmt)
    if fmt.has_global_scale:
        return fp.fake_quant_input(x, fmt, global_scale=input_scale)
    return fp.fake_quant_input(x, fmt, scale=input_scale)


def to_tensors(t: FPTensor) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Named tensors plus a JSON description (resume)."""
    tensors = {"codes": t.q.codes, "scales": t.q.scales}
    if t.q.global_scale is not None:
        tensors["global_scale"] = t.q.global_scale
    if t.input_scale is not None:
        tensors["input_scale"] = t.input_scale
    return tensors, {"fp": t.q.fmt.name, "spec": t.spec.to_dict()}


def from_tensors(tensors: dict[str, torch.Tensor], description: dict[str, object]) -> FPTensor:
    q = fp.FPQuantized(tensors["codes"], tensors["scales"], tensors.get("global_scale"), str(description["fp"]))
    return FPTensor(q, LayerSpec(**description["spec"]), tensors.get("input_scale"))  # type: ignore[arg-type]


def with_input_scale(t: FPTensor, input_scale: torch.Tensor | None) -> FPTensor:
    return replace(t, input_scale=input_scale)
