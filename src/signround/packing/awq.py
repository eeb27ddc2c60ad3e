"""AWQ GEMM checkpoints (``quant_method: "awq"``, ``version: "gemm"``), as AutoAWQ, transformers and vLLM read them.

Per layer three tensors, packed along the *output* dimension, eight 4-bit values per int32 word:

* ``qweight`` int32 ``[in, out / 8]``, ``qzeros`` int32 ``[G, out / 8]`` (zero points as-is, no offset),
  ``scales`` float16 ``[G, out]``;
* within each word, nibble ``i`` (bits ``4i .. 4i+3``) holds output column ``8 * word + AWQ_ORDER[i]``, the
  interleaving AWQ's GEMM kernel dequantizes with (``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``).

``zero_point: false`` means symmetric: every zero point is ``2^(bits-1) = 8``.  ``qzeros`` is stored anyway
(Intel's auto-round 0.16.1 fills it with 8 for ``format="auto_awq"`` with ``sym=True``), and the AWQ GEMM readers
require it: AutoAWQ's ``WQLinear_GEMM``, vLLM's AWQ GEMM method and GPTQModel's AWQ kernels (transformers' path).
vLLM's AWQ-Marlin has no unsigned 4-bit type without zero points, so ``zero_point: false`` runs on its slower GEMM
kernel there.  Loading accepts 4-bit ``zero_point`` true (asymmetric) or false (symmetric; ``qzeros`` must all be 8,
checked once at load); a checkpoint without ``qzeros`` is not accepted.  Writing stays ``zero_point: true`` only, so
symmetric schemes are refused for export.
Unquantized layers are listed in ``modules_to_not_convert``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..quant.int import QuantizedTensor
from ..schemes import LayerSpec
from .auto_round import _check_range, _fp16_scales
from .registry import Packer, TensorLayout, register_packer

__all__ = ["AWQ_ORDER", "QUANT_METHOD", "AwqPacker", "pack_awq", "unpack_awq"]

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PER_WORD = 8
_BITS = 4


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit unsigned ``values [rows, cols]`` -> int32 ``[rows, cols / 8]`` in AWQ's interleaved nibble order."""
    rows, cols = values.shape
    if cols % _PER_WORD:
        raise ValueError(f"AWQ packs {_PER_WORD} columns per int32 word; got {cols} columns")
    grouped = values.to(torch.int64).reshape(rows, cols // _PER_WORD, _PER_WORD)
    words = torch.zeros(rows, cols // _PER_WORD, dtype=torch.int64, device=values.device)
    for nibble, column in enumerate(AWQ_ORDER):
        words |= grouped[..., column] << (_BITS * nibble)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`: int32 ``[rows, n]`` -> uint8 ``[rows, 8 n]``."""
    rows, n = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(rows, n, _PER_WORD, dtype=torch.uint8, device=words.device)
    for nibble, column in enumerate(AWQ_ORDER):
        out[..., column] = ((w >> (_BITS * nibble)) & 0xF).to(torch.uint8)
    return out.reshape(rows, n * _PER_WORD)


def _load_spec_reason(spec: LayerSpec) -> str | None:
    """Why the AWQ GEMM layout cannot describe ``spec`` (reading), or None."""
    if spec.data_type != "int" or spec.bits != _BITS:
        return (
            f"{spec.bits}-bit {spec.data_type} is not loaded from AWQ; accepted: bits=4 int, zero_point true (asym) "
            "or false (sym)"
        )
    return None


@register_packer("awq_gemm")
class AwqPacker(Packer):
    """AWQ GEMM layout (4-bit): written asymmetric only; read asymmetric or symmetric (``zero_point: false``)."""

    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    per_layer_specs: ClassVar[bool] = False

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        if spec.data_type != "int" or spec.bits != _BITS or spec.sym:
            return (
                f"{spec.bits}-bit {'sym' if spec.sym else 'asym'} {spec.data_type} is not stored by AWQ; "
                "accepted: bits=4, sym=False (int, with zero points)"
            )
        return None

    def _layout_reason(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        """Why the tensor layout cannot describe the layer (reading and writing), or None."""
        if reason := _load_spec_reason(spec):
            return reason
        if out_features % _PER_WORD:
            return f"out_features={out_features} is not a multiple of {_PER_WORD}: AWQ packs 8 output columns per word"
        return self.group_reason(spec, in_features)

    def can_hold(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        return self.can_hold_spec(spec) or self._layout_reason(spec, in_features, out_features)

    def can_load(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        return self._layout_reason(spec, in_features, out_features)

    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        groups = self.described_groups(self._layout_reason(spec, in_features, out_features), spec, in_features)
        return {
            "qweight": ((in_features, out_features // _PER_WORD), torch.int32),
            "qzeros": ((groups, out_features // _PER_WORD), torch.int32),
            "scales": ((groups, out_features), torch.float16),
        }

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The layer's tensors; a sym layer gets its fixed zero point 8 in ``qzeros`` (what zero_point=false
        checkpoints hold).  Exports still refuse sym schemes through :meth:`can_hold_spec`."""
        out_features, in_features = qt.codes.shape
        if reason := self._layout_reason(qt.spec, in_features, out_features):
            raise ValueError(f"packing {self.name!r} cannot hold this layer: {reason}")
        _check_range("codes", qt.codes, 0, 15)
        _check_range("zeros", qt.zeros, 0, 15)
        return {
            "qweight": pack_awq(qt.codes.t()).contiguous(),
            "qzeros": pack_awq(qt.zeros.t()).contiguous(),
            "scales": _fp16_scales(qt.scales).t().contiguous(),
        }

    def unpack(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> QuantizedTensor:
        self.check_tensors(tensors, spec, in_features, out_features)
        return QuantizedTensor(  # transposed views, not copies (see packing/auto_round.py)
            codes=unpack_awq(tensors["qweight"]).t(),
            scales=tensors["scales"].t(),
            zeros=unpack_awq(tensors["qzeros"]).to(torch.int32).t(),
            spec=spec,
        )

    def check_values(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> None:
        """A symmetric (zero_point=false) layer must store the implicit zero point 8 everywhere: sym kernels use
        that constant, while other AWQ readers use the stored ``qzeros`` as-is."""
        qzeros = tensors["qzeros"]
        if not spec.sym or qzeros.device.type == "meta":
            return
        zeros = unpack_awq(qzeros.cpu())
        implicit = 2 ** (spec.bits - 1)
        if not bool((zeros == implicit).all()):
            raise ValueError(
                f"packing {self.name!r}: zero_point=false (symmetric) but qzeros hold values in "
                f"[{int(zeros.min())}, {int(zeros.max())}]; accepted: all {implicit} (or zero_point=true for "
                "per-group zero points)"
            )

    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """AutoAWQ's keys.  AWQ has one spec per model: a layer may only be kept unquantized."""
        if reason := self.can_hold_spec(default):
            raise ValueError(reason)
        not_converted = []
        for name, fields in overrides.items():
            if fields.get("bits", default.bits) >= 16:
                not_converted.append(name)
            elif any(fields.get(k, getattr(default, k)) != getattr(default, k) for k in fields):
                raise ValueError(f"AWQ stores one spec per model; layer {name!r} differs: {dict(fields)}")
        cfg: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "bits": default.bits,
            "group_size": default.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": sorted(not_converted) or None,
        }
        return cfg

    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        if cfg.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not an AWQ config: quant_method={cfg.get('quant_method')!r}; expected 'awq'")
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version={version!r} is not loaded; accepted: 'gemm'")
        zero_point = cfg.get("zero_point", True)
        if not isinstance(zero_point, bool):
            raise ValueError(f"AWQ zero_point={zero_point!r} is not loaded; accepted: true (asym) or false (sym)")
        # zero_point=false is symmetric (implicit zero point 8): Intel's auto-round writes it with "sym": true
        if not zero_point and cfg.get("sym") not in (None, True):
            raise ValueError(
                f"AWQ config has zero_point=false but sym={cfg['sym']!r}; accepted: zero_point=false with sym true "
                "or absent, or zero_point=true"
            )
        bits = int(cfg.get("bits", cfg.get("w_bit", 4)))
        group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        default = LayerSpec(bits=bits, group_size=group_size, sym=not zero_point)
        if reason := _load_spec_reason(default):
            raise ValueError(reason)
        # AWQ names skipped modules by substring (e.g. "lm_head", "vision_tower")
        overrides = {f".*{re.escape(name)}.*": {"bits": 16} for name in cfg.get("modules_to_not_convert") or []}
        return default, overrides
