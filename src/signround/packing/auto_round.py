"""Intel auto-round's native ``auto_round`` format for integer weight-only layers.

Written as auto-round 0.16 writes it, so its loaders, transformers, vLLM and SGLang read our output (facts and
sources: ``docs/formats.md``).  Per layer three tensors, GPTQ v1 layout, no ``g_idx``:

* ``qweight`` int32 ``[in * bits / 32, out]``: codes packed along the input dimension, 32 inputs per
  ``bits`` words (a continuous bit stream, see :mod:`signround.packing.bits`; 3-bit values straddle words);
* ``qzeros`` int32 ``[G, out * bits / 32]``: zero points packed the same way along the output dimension;
* ``scales`` float16 ``[G, out]``.

Two registered variants differ only in the zero-point convention, which ``packing_format`` declares once for the
whole checkpoint:

* ``"auto_round:auto_gptq"`` (what the reference writes for symmetric int models): zero points stored minus
  one, so the full-range symmetric zero ``2^(b-1)`` is stored as ``2^(b-1) - 1``.  Asymmetric layers are refused
  for writing: ``zero - 1`` cannot represent a zero point of 0 (the reference writer clamps it to 1, older writers
  wrapped it to -1 and corrupted the neighbouring fields).  Reading such foreign layers works: we add the one back
  modulo ``2^b``, which agrees with the reference readers on everything its 0.16 writer produces.
* ``"auto_round"`` (what the reference writes for asymmetric models that are not 4-bit): zero points as-is.
  Alias ``"auto_round:gptqmodel"``.  ``get_packer("auto_round").resolve(default)`` picks the variant the
  reference would write for a model whose default spec is ``default``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LAYER_SPEC_KEYS, LayerSpec
from .bits import RUN, pack_int32, unpack_int32
from .registry import Packer, TensorLayout, get_packer, register_packer

__all__ = ["AUTO_ROUND_BITS", "QUANT_METHOD", "AutoRoundGptqPacker", "AutoRoundPacker"]

QUANT_METHOD = "auto-round"
_LEGACY_QUANT_METHODS = (QUANT_METHOD, "intel/auto-round")  # the latter written by auto-round <= 0.3
AUTO_ROUND_BITS = (2, 3, 4, 8)

# Top-level weight keys, in the order the reference serialises them (its act_* keys are dropped at act_bits >= 16).
_WEIGHT_KEYS = ("bits", "data_type", "group_size", "sym")
# extra_config entries use the reference's QuantizationScheme field order.
_SCHEME_WEIGHT_KEYS = ("bits", "group_size", "sym", "data_type")
# Tuning metadata the reference writes (SerializedCompressorConfig field order), each dropped when equal to the
# reference default (its filter_quantization_config); lr/minmax_lr default to 1/iters (5e-3 when iters is 0/absent).
_TUNING_KEYS = (
    "amp",
    "batch_size",
    "enable_minmax_tuning",
    "enable_norm_bias_tuning",
    "enable_quanted_input",
    "gradient_accumulate_steps",
    "iters",
    "lr",
    "low_gpu_mem_usage",
    "minmax_lr",
    "nsamples",
    "scale_dtype",
    "seqlen",
)
_TUNING_DEFAULTS: dict[str, Any] = {
    "amp": True,
    "batch_size": 8,
    "dataset": "NeelNanda/pile-10k",
    "enable_minmax_tuning": True,
    "enable_norm_bias_tuning": False,
    "enable_quanted_input": True,
    "gradient_accumulate_steps": 1,
    "iters": 200,
    "low_gpu_mem_usage": False,
    "nsamples": 128,
    "scale_dtype": "torch.float16",
    "seqlen": 2048,
}
_TAIL_KEYS = ("autoround_version", "block_name_to_quantize")  # written after the tuning keys, as the reference does
_RESERVED_KEYS = (*LAYER_SPEC_KEYS, "quant_method", "packing_format", "extra_config")
_UNQUANTIZED_ENTRY = {"bits": 16, "data_type": "float"}
_ACT_KEYS = ("act_bits", "act_data_type", "act_group_size", "act_dynamic")  # LayerSpec's activation fields


def _reference_defaults(extra: Mapping[str, Any]) -> dict[str, Any]:
    defaults = dict(_TUNING_DEFAULTS)
    iters = extra.get("iters") or 0
    defaults["lr"] = defaults["minmax_lr"] = 1.0 / iters if iters else 5e-3
    return defaults


def _tuning_metadata(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` minus None values and values equal to the reference defaults, in the reference's key order."""
    bad = [k for k in _RESERVED_KEYS if k in extra]
    if bad:
        raise ValueError(f"extra must not set {bad}: the spec comes from `default`/`overrides`, the rest is fixed")
    defaults = _reference_defaults(extra)
    ordered = [k for k in _TUNING_KEYS if k in extra] + [k for k in extra if k not in _TUNING_KEYS + _TAIL_KEYS]
    ordered += [k for k in _TAIL_KEYS if k in extra]
    return {k: extra[k] for k in ordered if extra[k] is not None and not (k in defaults and defaults[k] == extra[k])}


def _block_prefixes(blocks: Any) -> list[str] | None:
    """``block_name_to_quantize`` (comma-separated string or list) -> list of prefixes, or None if absent."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        return [b.strip() for b in blocks.split(",") if b.strip()]
    return [str(b) for b in blocks]


def _in_blocks(name: str, blocks: list[str]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in blocks)


def _layer_spec(name: str, default: LayerSpec, fields: Mapping[str, Any]) -> LayerSpec:
    """``default`` with a layer's field overrides, validated; errors name the layer."""
    try:
        return replace(default, **fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"layer {name!r}: invalid overrides {dict(fields)}: {err}") from err


def _fp16_scales(scales: torch.Tensor) -> torch.Tensor:
    """auto_round stores float16 scales; refuse a silent lossy cast from another scale dtype."""
    if scales.dtype == torch.float16:
        return scales
    converted = scales.to(torch.float16)
    if scales.device.type != "meta" and not torch.equal(converted.to(scales.dtype), scales):
        raise ValueError(
            f"auto_round stores scales as float16, and these {scales.dtype} scales are not exactly representable; "
            "quantize with scale_dtype=torch.float16"
        )
    return converted


def _check_range(name: str, values: torch.Tensor, low: int, high: int) -> None:
    if values.device.type == "meta" or values.numel() == 0:
        return
    vmin, vmax = int(values.min()), int(values.max())
    if vmin < low or vmax > high:
        raise ValueError(f"{name} hold values in [{vmin}, {vmax}], outside [{low}, {high}]")


class _AutoRoundLayout(Packer):
    """Shared GPTQ v1 tensor layout; subclasses fix the zero-point offset and the packing_format name."""

    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales")
    zero_offset: ClassVar[int] = 0  # subtracted (mod 2^bits) before a zero point is stored

    # -- shapes -------------------------------------------------------------------------------------------------
    def _spec_layout_reason(self, spec: LayerSpec) -> str | None:
        if spec.data_type != "int":
            return f"data_type={spec.data_type!r} is not stored by packing {self.name!r}; accepted: 'int'"
        if spec.bits not in AUTO_ROUND_BITS:
            return f"bits={spec.bits} is not stored by packing {self.name!r}; accepted: {list(AUTO_ROUND_BITS)}"
        return None

    def layout_reason(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        """Why the tensor layout cannot describe the layer (reading and writing), or None."""
        if reason := self._spec_layout_reason(spec):
            return reason
        if in_features % RUN:
            return (
                f"in_features={in_features} is not a multiple of {RUN}: qweight packs {RUN} input rows into "
                f"bits={spec.bits} int32 words (the reference keeps such layers in 16 bit)"
            )
        if out_features % RUN:
            return (
                f"out_features={out_features} is not a multiple of {RUN}: qzeros packs {RUN} output columns into "
                f"bits={spec.bits} int32 words (the reference keeps such layers in 16 bit)"
            )
        return self.group_reason(spec, in_features)

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        return self._spec_layout_reason(spec)

    def can_hold(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        return self.can_hold_spec(spec) or self.layout_reason(spec, in_features, out_features)

    def can_load(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        return self.layout_reason(spec, in_features, out_features)

    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        groups = self.described_groups(self.layout_reason(spec, in_features, out_features), spec, in_features)
        return {
            "qweight": ((in_features // RUN * spec.bits, out_features), torch.int32),
            "qzeros": ((groups, out_features // RUN * spec.bits), torch.int32),
            "scales": ((groups, out_features), torch.float16),
        }

    # -- tensors ------------------------------------------------------------------------------------------------
    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        spec = qt.spec
        out_features, in_features = qt.codes.shape
        self.check_holds(spec, in_features, out_features)
        groups = in_features // effective_group_size(spec.group_size, in_features)
        for name, t in (("scales", qt.scales), ("zeros", qt.zeros)):
            if tuple(t.shape) != (out_features, groups):
                raise ValueError(
                    f"QuantizedTensor.{name} has shape {tuple(t.shape)}, expected {(out_features, groups)}"
                )
        maxq = 2**spec.bits - 1
        _check_range("codes", qt.codes, 0, maxq)
        _check_range("zeros", qt.zeros, 0, maxq)
        stored_zeros = (qt.zeros.t().to(torch.int32) - self.zero_offset) & maxq
        return {
            "qweight": pack_int32(qt.codes.t(), spec.bits, dim=0).contiguous(),
            "qzeros": pack_int32(stored_zeros, spec.bits, dim=1).contiguous(),
            "scales": _fp16_scales(qt.scales).t().contiguous(),
        }

    def unpack(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> QuantizedTensor:
        self.check_tensors(tensors, spec, in_features, out_features)
        maxq = 2**spec.bits - 1
        stored_zeros = unpack_int32(tensors["qzeros"], spec.bits, dim=1).to(torch.int32)
        # transposed views, not copies: the torch backend unpacks on every forward, and dequantizing the views
        # yields the [in, out]-major weight that F.linear reads without a transpose either
        return QuantizedTensor(
            codes=unpack_int32(tensors["qweight"], spec.bits, dim=0).t(),
            scales=tensors["scales"].t(),
            zeros=((stored_zeros + self.zero_offset) & maxq).t(),
            spec=spec,
        )

    # -- config -------------------------------------------------------------------------------------------------
    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The reference's config body.

        ``extra`` carries tuning metadata (``iters``, ``nsamples``, ``seqlen``, ``lr``, ...), ``autoround_version``
        and ``block_name_to_quantize``; values equal to the reference defaults are dropped, as it does.

        ``extra_config`` lists, per layer: only the differing weight keys for layers inside
        ``block_name_to_quantize``; every scheme key for quantized layers outside it (e.g. ``lm_head``), because
        vLLM and the reference treat layers outside the blocks as 16 bit unless listed — so callers must include such
        layers in ``overrides`` even with an empty diff (an empty diff always gets the full entry);
        ``{"bits": 16, "data_type": "float"}`` for layers kept unquantized.
        """
        cfg: dict[str, Any] = {key: getattr(default, key) for key in _WEIGHT_KEYS}
        cfg.update(_tuning_metadata(extra))
        cfg["quant_method"] = QUANT_METHOD
        cfg["packing_format"] = self.name
        blocks = _block_prefixes(extra.get("block_name_to_quantize"))
        extra_config = {}
        for name, fields in overrides.items():
            entry = self._extra_config_entry(name, default, fields, blocks)
            if entry:
                extra_config[name] = entry
        if extra_config:
            cfg["extra_config"] = extra_config
        try:
            json.dumps(cfg)
        except TypeError as err:
            raise ValueError(f"quantization_config must hold JSON values only: {err}") from err
        return cfg

    def _extra_config_entry(
        self, name: str, default: LayerSpec, fields: Mapping[str, Any], blocks: list[str] | None
    ) -> dict[str, Any]:
        if fields.get("bits", default.bits) >= 16:
            return dict(_UNQUANTIZED_ENTRY)
        spec = _layer_spec(name, default, fields)
        if not fields or (blocks is not None and not _in_blocks(name, blocks)):
            # the reference lists every QuantizationScheme field of such a layer (its act_* values for W*A16
            # follow from the weight ones; its None-valued super_* / rotation fields are left out)
            quantized_act = spec.act_bits < 16  # fp schemes: the layer's own activation scheme
            return {
                **{key: getattr(spec, key) for key in _SCHEME_WEIGHT_KEYS},
                "act_bits": spec.act_bits,
                "act_group_size": spec.act_group_size if quantized_act else spec.group_size,
                "act_sym": True if quantized_act else spec.sym,
                "act_data_type": spec.act_data_type if quantized_act else "float",
                "act_dynamic": spec.act_dynamic if quantized_act else True,
            }
        keys = (*_SCHEME_WEIGHT_KEYS, *_ACT_KEYS)  # act_*: fp layers whose activation scheme differs from the default
        diff = {key: getattr(spec, key) for key in keys if getattr(spec, key) != getattr(default, key)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in diff.items()}  # FP8_BLOCK's group as JSON

    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        """``(default, overrides)`` from an auto-round config (ours or the reference's).

        ``extra_config`` keys are returned as written: the reference also writes regular expressions there, so
        matching them against module names is the loader's job.  Unquantized layers come back as ``{"bits": 16}``.
        """
        method = cfg.get("quant_method")
        if method not in _LEGACY_QUANT_METHODS:
            raise ValueError(f"not an auto-round config: quant_method={method!r}; expected {QUANT_METHOD!r}")
        packing = cfg.get("packing_format")
        if packing is not None and get_packer(packing) is not self:
            raise ValueError(f"config has packing_format={packing!r}; read it with get_packer({packing!r})")
        act = {k: cfg[k] for k in _ACT_KEYS if cfg.get(k) is not None} if (cfg.get("act_bits") or 16) < 16 else {}
        default = LayerSpec(
            bits=cfg["bits"],
            group_size=cfg["group_size"],
            sym=cfg["sym"],
            data_type=cfg.get("data_type", "int"),
            **act,
        )
        overrides: dict[str, dict[str, Any]] = {}
        for name, entry in (cfg.get("extra_config") or {}).items():
            if (entry.get("bits") or default.bits) >= 16:
                overrides[name] = {"bits": 16}
                continue
            fields = {k: entry[k] for k in LAYER_SPEC_KEYS if entry.get(k) is not None}
            if fields.get("act_bits", default.act_bits) >= 16:  # None / 16 / 32 all mean unquantized activations
                for key in _ACT_KEYS:
                    fields.pop(key, None)
            _layer_spec(name, default, fields)
            overrides[name] = {k: v for k, v in fields.items() if getattr(default, k) != v}
        return default, overrides


@register_packer("auto_round", "auto_round:gptqmodel")
class AutoRoundPacker(_AutoRoundLayout):
    """``packing_format: "auto_round"``: zero points stored as-is (any symmetry)."""

    zero_offset: ClassVar[int] = 0

    def resolve(self, default: LayerSpec) -> Packer:
        """Symmetric int models get ``auto_round:auto_gptq``, as the reference writes them (and vLLM/SGLang
        accept only that variant); asymmetric ones keep zero points as-is."""
        if default.data_type != "int":  # floating-point schemes: their own tensors (auto_round_fp)
            from .auto_round_fp import resolve_fp

            return resolve_fp(default)
        return get_packer(AutoRoundGptqPacker.name) if default.sym else self


@register_packer("auto_round:auto_gptq")
class AutoRoundGptqPacker(_AutoRoundLayout):
    """``packing_format: "auto_round:auto_gptq"``: zero points stored minus one (GPTQ v1 convention)."""

    zero_offset: ClassVar[int] = 1

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        if not spec.sym:
            return (
                f"sym=False: packing {self.name!r} stores zero points minus one, and the reference writer clamps a "
                "zero point of 0 to 1; use packing 'auto_round' for asymmetric layers"
            )
        return self._spec_layout_reason(spec)
