"""The tensor layout shared by every floating-point packing (auto_round's and compressed-tensors' fp formats).

Both store the same per-layer tensors, under the same names: ``weight_packed`` uint8 ``[out, in / 2]`` (fp4: two
E2M1 codes per byte, element ``2i`` in the low nibble) or ``weight`` float8_e4m3fn ``[out, in]`` (fp8 codes), the
block scales, NVFP4's ``weight_global_scale`` float32 ``[1]`` and, where activations are quantized with a calibrated
scale, one float32 ``[1]`` input scale.  They differ only in which specs they accept, the input scale's name and how
the block scales are shaped and named (auto_round's FP8 keeps its reference's ``weight_scale`` / ``weight_scale_inv``
convention), so :class:`FPLayout` does the rest once and a packer overrides the scale hooks where it differs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..quant import fp
from ..quant.fp_tensor import FPTensor, needs_input_scale, weight_format
from ..schemes import LayerSpec
from .registry import Packer, TensorLayout

__all__ = ["FPLayout"]

_FP32 = torch.float32
_FP8 = torch.float8_e4m3fn


class FPLayout(Packer):
    """Layout, pack and unpack of :class:`~signround.quant.fp_tensor.FPTensor` layers.

    Subclasses say which specs they hold (:meth:`can_hold_spec`, :meth:`can_hold`, where :meth:`fp_layout_reason`
    checks the block grid), name the input scale, and override the scale hooks where their scales are not
    ``weight_scale`` ``[R, C]`` (one per block, :meth:`_scale_shape`) plus NVFP4's ``weight_global_scale``.
    """

    input_scale_name: ClassVar[str] = ""

    # -- shapes -------------------------------------------------------------------------------------------------
    def fp_layout_reason(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        """:meth:`can_hold_spec`'s reason, else why the weight format's blocks do not cut the layer, or None."""
        if reason := self.can_hold_spec(spec):
            return reason
        try:
            fp._Grid.of(weight_format(spec), (out_features, in_features))
        except ValueError as err:
            return str(err)
        return None

    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        if reason := self.can_hold(spec, in_features, out_features):
            raise ValueError(f"packing {self.name!r} cannot describe this layer: {reason}")
        fmt = weight_format(spec)
        grid = fp._Grid.of(fmt, (out_features, in_features))
        layout: TensorLayout = {}
        if fmt.element is fp.E2M1:
            layout["weight_packed"] = ((out_features, in_features // 2), torch.uint8)
        else:
            layout["weight"] = ((out_features, in_features), _FP8)
        layout.update(self._scale_layout(fmt, grid))
        if needs_input_scale(spec):
            layout[self.input_scale_name] = ((1,), _FP32)
        return layout

    def _scale_shape(self, fmt: fp.FPFormat, grid: Any) -> tuple[int, ...]:
        """The stored ``weight_scale`` shape: one value per block ``[R, C]``."""
        return (grid.n_rows, grid.n_cols)

    def _scale_layout(self, fmt: fp.FPFormat, grid: Any) -> TensorLayout:
        layout: TensorLayout = {"weight_scale": (self._scale_shape(fmt, grid), fp._SCALE_DTYPES[fmt.scale])}
        if fmt.has_global_scale:
            layout["weight_global_scale"] = ((1,), _FP32)
        return layout

    # -- tensors ------------------------------------------------------------------------------------------------
    def pack(self, qt: FPTensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not isinstance(qt, FPTensor):
            raise ValueError(f"packing {self.name!r} stores floating-point layers, got {type(qt).__name__}")
        q, spec = qt.q, qt.spec
        out_features, in_features = q.shape
        self.check_holds(spec, in_features, out_features)
        if q.fmt != weight_format(spec):
            raise ValueError(f"the layer was quantized as {q.fmt.name}, its spec names {weight_format(spec).name}")
        tensors: dict[str, torch.Tensor] = {}
        if q.fmt.element is fp.E2M1:
            tensors["weight_packed"] = fp.pack_fp4(q.codes).contiguous()
        else:
            tensors["weight"] = q.codes.view(_FP8).contiguous()
        tensors.update(self._pack_scales(q))
        if needs_input_scale(spec):
            if qt.input_scale is None:
                raise ValueError(
                    f"{spec.act_data_type} activations need a calibrated input scale ({self.input_scale_name}); "
                    "quantize with calibration data (the scale is measured on the layer's inputs)"
                )
            tensors[self.input_scale_name] = qt.input_scale.detach().to(_FP32).reshape(1).contiguous()
        return tensors

    def _pack_scales(self, q: fp.FPQuantized) -> dict[str, torch.Tensor]:
        shape = self._scale_shape(q.fmt, fp._Grid.of(q.fmt, q.shape))
        out = {"weight_scale": q.scales.reshape(shape).contiguous()}
        if q.global_scale is not None:
            out["weight_global_scale"] = q.global_scale.to(_FP32).reshape(1).contiguous()
        return out

    def unpack(  # type: ignore[override]
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> FPTensor:
        self.check_tensors(tensors, spec, in_features, out_features)
        fmt = weight_format(spec)
        if fmt.element is fp.E2M1:
            codes = fp.unpack_fp4(tensors["weight_packed"])
        else:
            codes = tensors["weight"].view(torch.uint8)
        grid = fp._Grid.of(fmt, (out_features, in_features))
        scales, global_scale = self._unpack_scales(tensors, fmt, grid)
        q = fp.FPQuantized(codes=codes, scales=scales, global_scale=global_scale, fmt=fmt)
        return FPTensor(q, spec, tensors.get(self.input_scale_name) if needs_input_scale(spec) else None)

    def _unpack_scales(
        self, tensors: Mapping[str, torch.Tensor], fmt: fp.FPFormat, grid: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scales = tensors["weight_scale"].reshape(grid.n_rows, grid.n_cols)
        return scales, tensors["weight_global_scale"] if fmt.has_global_scale else None
