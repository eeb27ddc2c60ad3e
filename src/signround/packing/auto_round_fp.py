"""Intel auto-round's ``auto_round`` format for the floating-point schemes (MXFP4 / MXFP8, NVFP4, FP8).

Written with the tensor names, shapes and dtypes auto-round 0.16 writes (its ``export_to_nvfp_mx`` and
``export_to_fp8``), per layer:

* ``packing_format: "auto_round:llm_compressor"`` (MX and NV, compressed-tensors' names):

  - ``weight_packed`` uint8 ``[out, in / 2]`` (fp4: two E2M1 codes per byte, element ``2i`` in the low nibble) or
    ``weight`` float8_e4m3fn ``[out, in]`` (MXFP8);
  - ``weight_scale``: uint8 E8M0 exponents ``[out, in / 32]`` (MX) or float8_e4m3fn ``[out, in / 16]`` (NVFP4);
  - NVFP4: ``weight_global_scale`` float32 ``[1]`` and, when activations are quantized, ``input_global_scale``
    float32 ``[1]`` (``448 * 6 / amax`` of the calibration inputs).

* ``packing_format: "auto_round:fp8_static"`` (FP8 with quantized activations: FP8_STATIC, FP8_BLOCK) or
  ``"auto_round:fp8"`` (FPW8A16; the reference writes no packing_format there, which loads as this):
  ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` ``[out]`` per channel / ``[1]`` per tensor, or
  ``weight_scale_inv`` ``[ceil(out / 128), ceil(in / 128)]`` per 128x128 block; FP8_STATIC's ``input_scale`` ``[1]``
  (``amax / 448``).  Scales are float32: the reference stores them in the model's dtype, which for a bf16 model
  rounds them and changes the dequantized weights; float32 keeps the tuned values exactly (a float32 model's
  checkpoint is the reference's bit for bit).

The tensors are laid out, packed and unpacked by :class:`~signround.packing.fp_layout.FPLayout` (shared with
compressed-tensors' fp formats); FP8's ``weight_scale`` / ``weight_scale_inv`` convention is this module's.

The config body is the reference's (top-level ``act_*`` keys for the activation scheme); see
:class:`~signround.packing.auto_round.AutoRoundPacker` for ``extra_config`` and the tuning metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..quant import fp
from ..schemes import LayerSpec, fp_format_of
from .auto_round import _AutoRoundLayout
from .fp_layout import FPLayout
from .registry import Packer, TensorLayout, get_packer, register_packer

__all__ = ["AutoRoundFP8Packer", "AutoRoundFP8WeightOnlyPacker", "AutoRoundMXNVPacker", "fp_packing"]

_FP32 = torch.float32


def fp_packing(spec: LayerSpec) -> str | None:
    """The auto_round ``packing_format`` the reference writes for a floating-point spec (None: not floating point)."""
    fmt = fp_format_of(spec)
    if fmt is None:
        return None
    if spec.data_type in ("mx_fp", "nv_fp"):
        return AutoRoundMXNVPacker.name
    return AutoRoundFP8Packer.name if spec.act_bits < 16 else AutoRoundFP8WeightOnlyPacker.name


class _FPLayout(FPLayout, _AutoRoundLayout):
    """The floating-point layers of one auto_round packing; subclasses name the formats and stored tensors."""

    data_types: ClassVar[tuple[str, ...]] = ()

    # -- shapes -------------------------------------------------------------------------------------------------
    def _spec_layout_reason(self, spec: LayerSpec) -> str | None:
        if spec.data_type not in self.data_types or fp_format_of(spec) is None:
            return f"data_type={spec.data_type!r} is not stored by packing {self.name!r}; accepted: {list(self.data_types)}"
        return None

    def layout_reason(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        return self.fp_layout_reason(spec, in_features, out_features)

    # -- config -------------------------------------------------------------------------------------------------
    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The reference's body, with its activation keys after the weight ones (``act_sym`` is always True)."""
        body = super().quantization_config(default, overrides, extra)
        weight = {k: body.pop(k) for k in ("bits", "data_type", "group_size", "sym")}
        weight["group_size"] = list(default.group_size) if isinstance(default.group_size, tuple) else default.group_size
        act = {
            "act_bits": default.act_bits,
            "act_data_type": default.act_data_type,
            "act_group_size": default.act_group_size,
            "act_sym": True,
            "act_dynamic": default.act_dynamic,
        }
        return {**weight, **act, **self._format_keys(default), **body}

    def _format_keys(self, default: LayerSpec) -> dict[str, Any]:
        return {}


@register_packer("auto_round:llm_compressor")
class AutoRoundMXNVPacker(_FPLayout):
    """MXFP4 / MXFP8 / NVFP4 layers (``mx_fp``, ``nv_fp``)."""

    data_types: ClassVar[tuple[str, ...]] = ("mx_fp", "nv_fp")
    tensor_names: ClassVar[tuple[str, ...]] = (
        "weight_scale", "weight_packed", "weight_global_scale", "input_global_scale",
    )  # fmt: skip
    marker_tensors: ClassVar[tuple[str, ...]] = ("weight_scale",)
    input_scale_name: ClassVar[str] = "input_global_scale"


@register_packer("auto_round:fp8_static")
class AutoRoundFP8Packer(_FPLayout):
    """FP8 layers (``data_type="fp"``) with quantized activations; the reference's name for all of them."""

    data_types: ClassVar[tuple[str, ...]] = ("fp",)
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_scale", "weight_scale_inv", "input_scale")
    marker_tensors: ClassVar[tuple[str, ...]] = ("weight_scale", "weight_scale_inv")
    input_scale_name: ClassVar[str] = "input_scale"

    def _scale_layout(self, fmt: fp.FPFormat, grid: Any) -> TensorLayout:
        if fmt.block[0] == 1:  # per channel
            return {"weight_scale": ((grid.n_rows,), _FP32)}
        if fmt.block == (-1, -1):
            return {"weight_scale": ((1,), _FP32)}
        return {"weight_scale_inv": ((grid.n_rows, grid.n_cols), _FP32)}

    def _pack_scales(self, q: fp.FPQuantized) -> dict[str, torch.Tensor]:
        name = "weight_scale_inv" if q.fmt.block == (128, 128) else "weight_scale"
        s = q.scales.to(_FP32)
        return {name: (s if name == "weight_scale_inv" else s.reshape(-1)).contiguous()}

    def _unpack_scales(
        self, tensors: Mapping[str, torch.Tensor], fmt: fp.FPFormat, grid: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "weight_scale_inv" in self._scale_layout(fmt, grid):
            return tensors["weight_scale_inv"], None
        return tensors["weight_scale"].reshape(grid.n_rows, grid.n_cols), None

    def _format_keys(self, default: LayerSpec) -> dict[str, Any]:
        return {"fmt": "e4m3", "activation_scheme": "dynamic" if default.act_dynamic else "static"}


@register_packer("auto_round:fp8")
class AutoRoundFP8WeightOnlyPacker(AutoRoundFP8Packer):
    """FP8 weights with 16-bit activations (FPW8A16): the same tensors."""


def resolve_fp(default: LayerSpec) -> Packer:
    """The fp packer the reference writes for a model whose default spec is ``default``."""
    name = fp_packing(default)
    if name is None:
        raise ValueError(f"{default} is not a floating-point scheme")
    return get_packer(name)
