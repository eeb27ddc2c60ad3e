"""compressed-tensors' floating-point formats: ``format="llm_compressor"`` for the fp schemes.

Each layer is written with the tensors compressed-tensors 0.20's own compressor for its scheme reads (the format is
the one its ``infer_module_format`` assigns, so llm-compressor would write the same); names relative to the layer:

* ``nvfp4-pack-quantized`` (NVFP4): ``weight_packed`` uint8 ``[out, in / 2]`` (two E2M1 codes per byte, element
  ``2i`` in the low nibble), ``weight_scale`` float8_e4m3fn ``[out, in / 16]``, ``weight_global_scale`` float32
  ``[1]`` and, with static activations, ``input_global_scale`` float32 ``[1]``;
* ``mxfp4-pack-quantized`` (MXFP4): ``weight_packed`` as above, ``weight_scale`` uint8 E8M0 ``[out, in / 32]``;
* ``mxfp8-quantized`` (MXFP8): ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` uint8 E8M0 ``[out, in / 32]``;
* ``float-quantized`` (FP8 weights with quantized activations: FP8_STATIC, FP8_BLOCK) or ``naive-quantized`` (FP8
  weights only: FPW8A16; compressed-tensors' name for a weight-only fp8 scheme, decompressed the same way):
  ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` float32 ``[out, 1]`` per channel / ``[1]`` per tensor /
  ``[ceil(out / 128), ceil(in / 128)]`` per 128x128 block, FP8_STATIC's ``input_scale`` float32 ``[1]``.

Every stored value is signround's own (codes, scales, global and input scales), so compressed-tensors' decompression
gives our dequantized weights: bit for bit in float32 for FP8 (scales kept float32) and, through its own
``dequantize`` in float32, for NVFP4; its stock NVFP4 / MX decompressors return bfloat16 (ours rounded once).
Differences that are the reader's, not the checkpoint's:

* FP8 scales are stored float32 (compressed-tensors' own are in the model dtype); transformers' compressed-tensors
  loader creates them in the model dtype, so a bf16 / fp16 load rounds them (a float32 load is exact);
* MX activations are quantized at run time by the reader with its own scale rule (compressed-tensors 0.20's
  ``generate_mx_scales`` rounds ``amax`` to one mantissa bit first; ours is the OCP rule), so MX logits may differ
  slightly from the in-memory model's.  The ``_RCEIL`` schemes round the activation scale up, which no
  compressed-tensors QuantizationArgs field expresses: they are refused (use MXFP4 / MXFP8, or format auto_round);
* FP8_BLOCK's per-token groups of 128 inputs must be whole there: layers whose ``in_features`` is not a multiple of
  128 stay in 16 bit (as MX / NV layers whose input does not split into 32 / 16).

The tensors are laid out, packed and unpacked by :class:`~signround.packing.fp_layout.FPLayout` (shared with
auto_round's fp formats); the ``[1]`` per-tensor ``weight_scale`` shape is this module's.

The ``quantization_config`` is compressed-tensors' own ``QuantizationConfig`` (config groups of
``QuantizationScheme`` / ``QuantizationArgs``), parsed back by :meth:`parse_config` for signround's loader.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..quant import fp
from ..quant.fp_tensor import weight_format
from ..schemes import FP_ACT_FORMATS, FP_WEIGHT_FORMATS, LayerSpec, act_quant_of, fp_format_of
from .compressed_tensors import QUANT_METHOD, _ct, _layer_groups, _name_targets, _parse_groups
from .fp_layout import FPLayout
from .registry import Packer, get_packer, register_packer

__all__ = [
    "CTFP8Packer",
    "CTMXFP4Packer",
    "CTMXFP8Packer",
    "CTNVFP4Packer",
    "ct_fp_scheme",
    "resolve_ct_fp",
]

_FP8 = torch.float8_e4m3fn
_FP8_ACT_GROUP = 128  # FP8_BLOCK's activation groups: compressed-tensors needs whole ones


# -- our spec <-> compressed-tensors' QuantizationArgs -----------------------------------------------------------------
def _unexpressible(spec: LayerSpec) -> str | None:
    """Why compressed-tensors' QuantizationArgs cannot describe the spec (None: they can)."""
    if fp_format_of(spec) is None:
        return f"data_type={spec.data_type!r} bits={spec.bits} is not a floating-point scheme"
    act = act_quant_of(spec)
    if act is not None and fp.fp_format(act.format).rceil:
        return (
            f"act_data_type={spec.act_data_type!r} (activation scales rounded up) has no compressed-tensors "
            "equivalent; accepted fp schemes: MXFP4, MXFP8, NVFP4, FPW8A16, FP8_STATIC, FP8_BLOCK"
        )
    return None


def _weight_args(spec: LayerSpec) -> Any:
    ctq = _ct()
    fmt = weight_format(spec)
    common = {"num_bits": spec.bits, "type": "float", "symmetric": True, "dynamic": False}
    if fmt.scale is fp.ScaleKind.E8M0:  # as compressed-tensors' MXFP4 / MXFP8 presets
        return ctq.QuantizationArgs(
            **common, strategy="group", group_size=fmt.block[1], scale_dtype=torch.uint8, zp_dtype=torch.uint8
        )
    if fmt.scale is fp.ScaleKind.E4M3:  # as its NVFP4 preset
        return ctq.QuantizationArgs(
            **common, strategy="tensor_group", group_size=fmt.block[1], scale_dtype=_FP8, zp_dtype=_FP8
        )
    if fmt.block == (1, -1):
        return ctq.QuantizationArgs(**common, strategy="channel")
    if fmt.block == (-1, -1):
        return ctq.QuantizationArgs(**common, strategy="tensor")
    return ctq.QuantizationArgs(**common, strategy="block", block_structure=list(fmt.block))


def _input_args(spec: LayerSpec) -> Any | None:
    act = act_quant_of(spec)
    if act is None:
        return None
    ctq = _ct()
    fmt = fp.fp_format(act.format)
    common = {"num_bits": spec.act_bits, "type": "float", "symmetric": True}
    if fmt.scale is fp.ScaleKind.E8M0:  # MX: dynamic per 32, as compressed-tensors' MXFP4 / MXFP8 presets
        return ctq.QuantizationArgs(
            **common, strategy="group", group_size=fmt.block[1], dynamic=True, scale_dtype=torch.uint8,
            zp_dtype=torch.uint8,
        )  # fmt: skip
    if fmt.scale is fp.ScaleKind.E4M3:  # NVFP4: static global scale, dynamic block scales ("local")
        return ctq.QuantizationArgs(
            **common, strategy="tensor_group", group_size=fmt.block[1], dynamic="local", observer="static_minmax",
            scale_dtype=_FP8, zp_dtype=_FP8,
        )  # fmt: skip
    if act.static:  # FP8_STATIC: one calibrated scale per tensor, as compressed-tensors' FP8 preset
        return ctq.QuantizationArgs(**common, strategy="tensor", dynamic=False, observer="static_minmax")
    return ctq.QuantizationArgs(**common, strategy="group", group_size=fmt.block[1], dynamic=True)


def ct_fp_scheme(spec: LayerSpec, targets: list[str]) -> Any:
    """compressed-tensors' QuantizationScheme for a floating-point spec, its format as compressed-tensors infers it
    for a Linear layer; raises ``ValueError`` for a spec it cannot express."""
    if reason := _unexpressible(spec):
        raise ValueError(f"format 'llm_compressor' cannot describe {spec}: {reason}")
    from compressed_tensors.compressors.format import infer_module_format

    ctq = _ct()
    scheme = ctq.QuantizationScheme(targets=targets, weights=_weight_args(spec), input_activations=_input_args(spec))
    scheme.format = infer_module_format(torch.nn.Linear, scheme).value
    return scheme


def _args_key(args: Any) -> tuple[Any, ...] | None:
    """The fields of QuantizationArgs that decide the stored tensors and the computation (not observers)."""
    if args is None:
        return None
    value = lambda v: getattr(v, "value", v)  # noqa: E731 - enum or its value alike
    dynamic = value(args.dynamic)
    return (
        int(args.num_bits), str(value(args.type)), bool(args.symmetric), str(value(args.strategy)), args.group_size,
        tuple(args.block_structure or ()), dynamic if isinstance(dynamic, str) else bool(dynamic),
    )  # fmt: skip


@functools.cache
def _specs_by_key() -> dict[tuple[Any, ...], LayerSpec]:
    """Every fp spec compressed-tensors can express, by the key of its (weights, input_activations) args."""
    out: dict[tuple[Any, ...], LayerSpec] = {}
    acts: list[dict[str, Any]] = [{}]
    acts += [
        {"act_data_type": d, "act_bits": b, "act_group_size": g, "act_dynamic": dyn} for d, b, g, dyn in FP_ACT_FORMATS
    ]
    for (data_type, bits, group_size), act in ((w, a) for w in FP_WEIGHT_FORMATS for a in acts):
        try:
            spec = LayerSpec(bits=bits, group_size=group_size, data_type=data_type, **act)
        except ValueError:
            continue
        if _unexpressible(spec) is None:
            out.setdefault((_args_key(_weight_args(spec)), _args_key(_input_args(spec))), spec)
    return out


def _spec_of(group_name: str, scheme: Any) -> LayerSpec:
    """Our LayerSpec for a compressed-tensors fp scheme; refuses what signround does not compute."""
    if scheme.output_activations is not None:
        raise ValueError(f"config group {group_name!r}: output activation quantization is not loaded")
    key = (_args_key(scheme.weights), _args_key(scheme.input_activations))
    spec = _specs_by_key().get(key)
    if spec is None:
        raise ValueError(
            f"config group {group_name!r}: weights / input_activations {key} are not a scheme signround loads; "
            "accepted: MXFP4, MXFP8, NVFP4 (and their weight-only forms), FPW8A16, FP8_STATIC, FP8_BLOCK"
        )
    return spec


# -- the packers -----------------------------------------------------------------------------------------------------
class _CTFPLayout(FPLayout):
    """The layers of one compressed-tensors fp format; subclasses name the weight formats and their tensors."""

    weight_formats: ClassVar[tuple[str, ...]] = ()
    marker_tensors: ClassVar[tuple[str, ...]] = ("weight_scale",)
    input_scale_name: ClassVar[str] = ""

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        if fp_format_of(spec) not in self.weight_formats:
            return (
                f"data_type={spec.data_type!r} bits={spec.bits} group_size={spec.group_size!r} is not stored by "
                f"{self.name!r}; accepted weight formats: {list(self.weight_formats)}"
            )
        return _unexpressible(spec)

    def can_hold(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        if reason := self.fp_layout_reason(spec, in_features, out_features):
            return reason
        act = act_quant_of(spec)
        group = fp.fp_format(act.format).block[1] if act is not None else -1
        if group > 0 and in_features % group:
            return f"in_features={in_features} is not a multiple of the activation group {group} (compressed-tensors)"
        return None

    def _scale_shape(self, fmt: fp.FPFormat, grid: Any) -> tuple[int, ...]:
        """compressed-tensors' weight_scale shape: ``[1]`` per tensor, else one value per block ``[R, C]``."""
        return (1,) if fmt.block == (-1, -1) else (grid.n_rows, grid.n_cols)

    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """compressed-tensors' QuantizationConfig: one group for every Linear with the default spec, one group per
        other spec naming its layers; unquantized layers (and an unquantized lm_head) in ``ignore``.  The top-level
        ``format`` is the groups' one, ``mixed-precision`` when they differ (compressed-tensors' convention)."""
        ctq = _ct()
        by_spec, ignore = _layer_groups(default, overrides, extra)
        groups = {"group_0": ct_fp_scheme(default, ["Linear"])}
        for i, (spec, names) in enumerate(by_spec.items(), start=1):
            groups[f"group_{i}"] = ct_fp_scheme(spec, _name_targets(names))
        formats = {g.format for g in groups.values()}
        config = ctq.QuantizationConfig(
            config_groups=groups,
            format=formats.pop() if len(formats) == 1 else "mixed-precision",
            quantization_status="compressed",
            ignore=ignore,
        )
        return config.model_dump(mode="json")

    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        if cfg.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not a compressed-tensors config: quant_method={cfg.get('quant_method')!r}")
        config = _ct().QuantizationConfig.model_validate(dict(cfg))

        def spec_of(group_name: str, scheme: Any) -> LayerSpec:
            spec = _spec_of(group_name, scheme)
            if (reason := self.can_hold_spec(spec)) is not None:
                raise ValueError(f"config group {group_name!r}: {reason}")
            return spec

        default, overrides = _parse_groups(config, spec_of)
        if default is None:  # every group names its layers: the rest stays unquantized
            first = next((v for v in overrides.values() if v.get("bits", 16) < 16), None)
            if first is None:
                raise ValueError("compressed-tensors config quantizes no layer")
            default = LayerSpec(**first)
            overrides[".*"] = {"bits": 16}
        return default, {k: v for k, v in overrides.items() if v.get("bits", 16) >= 16 or LayerSpec(**v) != default}


@register_packer("nvfp4-pack-quantized")
class CTNVFP4Packer(_CTFPLayout):
    """NVFP4 (compressed-tensors' ``NVFP4PackedCompressor``)."""

    weight_formats: ClassVar[tuple[str, ...]] = ("nvfp4",)
    tensor_names: ClassVar[tuple[str, ...]] = (
        "weight_scale", "weight_packed", "weight_global_scale", "input_global_scale",
    )  # fmt: skip
    input_scale_name: ClassVar[str] = "input_global_scale"


@register_packer("mxfp4-pack-quantized")
class CTMXFP4Packer(_CTFPLayout):
    """MXFP4 (compressed-tensors' ``MXFP4PackedCompressor``)."""

    weight_formats: ClassVar[tuple[str, ...]] = ("mxfp4",)
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_scale", "weight_packed")


@register_packer("mxfp8-quantized")
class CTMXFP8Packer(_CTFPLayout):
    """MXFP8 (compressed-tensors' ``MXFP8QuantizationCompressor``: fp8 weight, E8M0 scales as uint8)."""

    weight_formats: ClassVar[tuple[str, ...]] = ("mxfp8",)
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_scale",)


@register_packer("float-quantized", "naive-quantized")
class CTFP8Packer(_CTFPLayout):
    """FP8 per channel / per tensor / per 128x128 block (compressed-tensors' ``FloatQuantizationCompressor``, and
    ``NaiveQuantizationCompressor`` for weight-only layers: the same tensors)."""

    weight_formats: ClassVar[tuple[str, ...]] = ("fp8", "fp8_tensor", "fp8_block")
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_scale", "input_scale")
    input_scale_name: ClassVar[str] = "input_scale"


_PACKER_OF_FORMAT = {
    "nvfp4": CTNVFP4Packer,
    "mxfp4": CTMXFP4Packer,
    "mxfp8": CTMXFP8Packer,
    "fp8": CTFP8Packer,
    "fp8_tensor": CTFP8Packer,
    "fp8_block": CTFP8Packer,
}


def resolve_ct_fp(default: LayerSpec) -> Packer:
    """The compressed-tensors packer of a model whose default spec is the floating-point ``default``."""
    cls = _PACKER_OF_FORMAT.get(fp_format_of(default) or "")
    if cls is None:
        raise ValueError(f"{default} is not a floating-point scheme compressed-tensors stores")
    return get_packer(cls.name)
