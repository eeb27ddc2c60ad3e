"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor's format; vLLM and transformers read it).

Per layer, names relative to the layer:

* ``weight_packed`` int32 ``[out, in * bits / 32]``: each row's codes as one dense bit stream (the same stream as
  :mod:`signround.packing.bits`; compressed-tensors stores the signed value ``q + 2^(b-1)``, which is exactly our
  unsigned code, since our codes are ``q + zero`` with the symmetric zero ``2^(b-1)``);
* ``weight_scale`` float16 ``[out, G]``;
* ``weight_zero_point`` int32 ``[out * bits / 32, G]`` for asymmetric layers only (packed along the output
  dimension, stored unsigned = signed zero point ``+ 2^(b-1)`` = our zero);
* ``weight_shape`` int64 ``[2]`` = ``(out, in)``.

Dequantization there is ``(q - zp) * scale`` with signed ``q`` and ``zp``, i.e. ours, ``(code - zero) * scale``.
The ``quantization_config`` is built and parsed with compressed-tensors' own dataclasses (an optional
dependency of this format: ``pip install compressed-tensors``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..quant.int import QuantizedTensor
from ..schemes import LayerSpec, fp_format_of
from .auto_round import _check_range, _fp16_scales
from .bits import RUN, pack_int32, unpack_int32
from .registry import Packer, TensorLayout, register_packer

__all__ = ["QUANT_METHOD", "CompressedTensorsPacker"]

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
BITS = (2, 3, 4, 8)


def _ct() -> Any:
    try:
        import compressed_tensors.quantization as ctq
    except ImportError as err:
        raise ImportError(
            "the llm_compressor format needs compressed-tensors: pip install 'compressed-tensors>=0.20'"
        ) from err
    return ctq


def _args(spec: LayerSpec) -> Any:
    ctq = _ct()
    if spec.group_size == -1:
        return ctq.QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym, strategy="channel")
    return ctq.QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.sym, strategy="group", group_size=spec.group_size
    )


def _target_pattern(target: str) -> str:
    """A compressed-tensors target / ignore entry as our full-match pattern ("re:" entries match at the start)."""
    if target.startswith("re:"):
        return f"(?:{target[3:]}).*"
    return "^" + re.escape(target) + "$"


def _name_targets(names: list[str]) -> list[str]:
    """compressed-tensors targets matching exactly these layer names."""
    return ["re:^" + re.escape(n) + "$" for n in sorted(names)]


def _layer_groups(
    default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
) -> tuple[dict[LayerSpec, list[str]], list[str]]:
    """The layers of each spec other than ``default`` (one config group each), and the ``ignore`` list: the
    unquantized layers and, unless it is quantized, ``lm_head``."""
    by_spec: dict[LayerSpec, list[str]] = {}
    ignore = [] if extra.get("quant_lm_head") else ["lm_head"]
    for name, fields in overrides.items():
        if fields.get("bits", default.bits) >= 16:
            ignore.append(name)
            continue
        spec = LayerSpec(**{**default.to_dict(), **fields})
        if spec != default:
            by_spec.setdefault(spec, []).append(name)
    return by_spec, sorted(set(ignore))


def _parse_groups(
    config: Any, spec_of: Callable[[str, Any], LayerSpec]
) -> tuple[LayerSpec | None, dict[str, dict[str, Any]]]:
    """A parsed QuantizationConfig's spec for every Linear (None: no group targets them all) and the overrides of
    the layers its other targets and ``ignore`` name; ``spec_of(group_name, scheme)`` reads (and checks) a group."""
    default: LayerSpec | None = None
    overrides: dict[str, dict[str, Any]] = {}
    for group_name, scheme in config.config_groups.items():
        spec = spec_of(group_name, scheme)
        if "Linear" in scheme.targets:
            if default is not None and spec != default:
                raise ValueError("two config groups target every Linear with different specs")
            default = spec
        for target in (t for t in scheme.targets if t != "Linear"):
            overrides[_target_pattern(target)] = spec.to_dict()
    for target in config.ignore or []:
        overrides[_target_pattern(target)] = {"bits": 16}
    return default, overrides


@register_packer(FORMAT)
class CompressedTensorsPacker(Packer):
    """compressed-tensors ``pack-quantized`` for int weight-only layers (bits 2, 3, 4, 8; group or channel)."""

    tensor_names: ClassVar[tuple[str, ...]] = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

    def resolve(self, default: LayerSpec) -> Packer:
        """Floating-point schemes are written in compressed-tensors' fp formats (:mod:`.compressed_tensors_fp`)."""
        if fp_format_of(default) is not None:
            from .compressed_tensors_fp import resolve_ct_fp

            return resolve_ct_fp(default)
        return self

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        if spec.data_type != "int" or spec.bits not in BITS:
            return f"bits={spec.bits} {spec.data_type} is not stored by {FORMAT!r}; accepted: int, bits {list(BITS)}"
        return None

    def can_hold(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        if reason := self.can_hold_spec(spec):
            return reason
        if in_features % RUN:
            return f"in_features={in_features} is not a multiple of {RUN} (whole int32 words per row)"
        if not spec.sym and out_features % RUN:
            return f"out_features={out_features} is not a multiple of {RUN} (asymmetric zero points packed by column)"
        return self.group_reason(spec, in_features)

    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        groups = self.described_groups(self.can_hold(spec, in_features, out_features), spec, in_features)
        layout: TensorLayout = {
            "weight_packed": ((out_features, in_features // RUN * spec.bits), torch.int32),
            "weight_scale": ((out_features, groups), torch.float16),
        }
        if not spec.sym:
            layout["weight_zero_point"] = ((out_features // RUN * spec.bits, groups), torch.int32)
        layout["weight_shape"] = ((2,), torch.int64)
        return layout

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        out_features, in_features = qt.codes.shape
        spec = qt.spec
        self.check_holds(spec, in_features, out_features)
        maxq = 2**spec.bits - 1
        _check_range("codes", qt.codes, 0, maxq)
        if spec.sym:
            _check_range("zeros", qt.zeros, 2 ** (spec.bits - 1), 2 ** (spec.bits - 1))
        tensors = {
            "weight_packed": pack_int32(qt.codes, spec.bits, dim=1).contiguous(),
            "weight_scale": _fp16_scales(qt.scales).contiguous(),
        }
        if not spec.sym:
            _check_range("zeros", qt.zeros, 0, maxq)
            tensors["weight_zero_point"] = pack_int32(qt.zeros, spec.bits, dim=0).contiguous()
        tensors["weight_shape"] = torch.tensor([out_features, in_features], dtype=torch.int64, device=qt.codes.device)
        return tensors

    def unpack(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> QuantizedTensor:
        self.check_tensors(tensors, spec, in_features, out_features)
        codes = unpack_int32(tensors["weight_packed"], spec.bits, dim=1)
        if spec.sym:  # made where the codes are: a host tensor copied in would cost a copy and a sync per forward
            zeros = torch.full(
                tensors["weight_scale"].shape, 2 ** (spec.bits - 1), dtype=torch.int32, device=codes.device
            )
        else:
            zeros = unpack_int32(tensors["weight_zero_point"], spec.bits, dim=0).to(torch.int32)
        return QuantizedTensor(
            codes=codes.contiguous(),
            scales=tensors["weight_scale"].contiguous(),
            zeros=zeros,
            spec=spec,
        )

    def check_values(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> None:
        shape = tensors["weight_shape"]
        if shape.device.type != "meta" and tuple(int(v) for v in shape) != (out_features, in_features):
            raise ValueError(f"weight_shape {shape.tolist()} does not match the layer ({out_features}, {in_features})")

    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """compressed-tensors' QuantizationConfig: one group targeting every Linear with the default spec, one
        group per other spec targeting its layers by exact name; unquantized layers (and an unquantized lm_head)
        in ``ignore``."""
        ctq = _ct()
        by_spec, ignore = _layer_groups(default, overrides, extra)
        groups = {"group_0": ctq.QuantizationScheme(targets=["Linear"], weights=_args(default), format=FORMAT)}
        for i, (spec, names) in enumerate(by_spec.items(), start=1):
            groups[f"group_{i}"] = ctq.QuantizationScheme(
                targets=_name_targets(names), weights=_args(spec), format=FORMAT
            )
        config = ctq.QuantizationConfig(
            config_groups=groups, format=FORMAT, quantization_status="compressed", ignore=ignore
        )
        return config.model_dump(mode="json")

    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        if cfg.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not a compressed-tensors config: quant_method={cfg.get('quant_method')!r}")
        ctq = _ct()
        config = ctq.QuantizationConfig.model_validate(dict(cfg))

        def spec_of(group_name: str, scheme: Any) -> LayerSpec:
            fmt = scheme.format or config.format
            if fmt != FORMAT:
                raise ValueError(f"config group {group_name!r} has format {fmt!r}; signround loads {FORMAT!r} only")
            return _spec_of(group_name, scheme)

        default, overrides = _parse_groups(config, spec_of)
        if default is None:  # every group names its layers: the rest stays unquantized
            first = next(iter(overrides.values()), None)
            if first is None or first.get("bits", 16) >= 16:
                raise ValueError("compressed-tensors config quantizes no layer")
            default = LayerSpec(**first)
            overrides[".*"] = {"bits": 16}
        return default, {k: v for k, v in overrides.items() if v.get("bits", 16) >= 16 or LayerSpec(**v) != default}


def _spec_of(group_name: str, scheme: Any) -> LayerSpec:
    """Our LayerSpec for a compressed-tensors scheme; refuses what pack-quantized weight-only loading cannot run."""
    w = scheme.weights
    where = f"config group {group_name!r}"
    if w is None or scheme.input_activations is not None or scheme.output_activations is not None:
        raise ValueError(f"{where}: only weight-only int quantization is loaded (activations must not be quantized)")
    if str(w.type) not in ("int", "QuantizationType.INT"):
        raise ValueError(f"{where}: weights of type {w.type!r} are not loaded; accepted: int")
    strategy = str(getattr(w.strategy, "value", w.strategy))
    if strategy not in ("group", "channel"):
        raise ValueError(f"{where}: strategy {strategy!r} is not loaded; accepted: group, channel")
    if getattr(w, "actorder", None) not in (None, False, "static") and str(w.actorder) not in ("static",):
        raise ValueError(f"{where}: actorder={w.actorder!r} (permuted groups) is not loaded")
    group_size = -1 if strategy == "channel" else int(w.group_size)
    return LayerSpec(bits=int(w.num_bits), group_size=group_size, sym=bool(w.symmetric))
