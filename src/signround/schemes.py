"""Quantization schemes (named presets) and their resolution into a per-layer ``QuantPlan``.

``LayerSpec`` is the single description of how one layer is quantized; every later stage (tuning,
packing, kernels) reads it and nothing re-derives bits / group size / symmetry from strings.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any

from .quant.gguf_mixtures import MIXTURES
from .quant.gguf_types import GGUF_TYPES, GGUFType

SUPPORTED_BITS = (2, 3, 4, 8)
GGUF_DATA_TYPE_PREFIX = "gguf:"
GGUF_SCHEME_PREFIX = "GGUF:"
# Floating-point weight grids, as data: (data_type, bits, group_size) -> the quant.fp format computing it.  The
# reference's names: group_size -1 is per output channel, 0 per tensor, (128, 128) a 2-D block (FP8_BLOCK).
FP_WEIGHT_FORMATS: dict[tuple[str, int, int | tuple[int, int]], str] = {
    ("mx_fp", 4, 32): "mxfp4",
    ("mx_fp", 8, 32): "mxfp8",
    ("nv_fp", 4, 16): "nvfp4",
    ("fp", 8, -1): "fp8",
    ("fp", 8, 0): "fp8_tensor",
    ("fp", 8, (128, 128)): "fp8_block",
}
FP_DATA_TYPES = tuple(dict.fromkeys(dt for dt, _b, _g in FP_WEIGHT_FORMATS))


@dataclass(frozen=True)
class ActQuant:
    """How a layer's input is quantized on the fly: the quant.fp format of its blocks (along the input features) and
    whether its scale is calibrated (``static``: FP8_STATIC's per-tensor scale, NVFP4's global scale)."""

    format: str
    static: bool


# (act_data_type, act_bits, act_group_size, act_dynamic) -> ActQuant: the reference's activation schemes.
FP_ACT_FORMATS: dict[tuple[str, int, int, bool], ActQuant] = {
    ("mx_fp", 4, 32, True): ActQuant("mxfp4", static=False),
    ("mx_fp_rceil", 4, 32, True): ActQuant("mxfp4_rceil", static=False),
    ("mx_fp", 8, 32, True): ActQuant("mxfp8", static=False),
    ("mx_fp_rceil", 8, 32, True): ActQuant("mxfp8_rceil", static=False),
    ("nv_fp4_with_static_gs", 4, 16, True): ActQuant("nvfp4", static=True),  # block scales dynamic, global static
    ("fp", 8, 0, False): ActQuant("fp8_tensor", static=True),  # FP8_STATIC
    ("fp", 8, 128, True): ActQuant("fp8_act128", static=False),  # FP8_BLOCK: per token, per 128 inputs
}
SUPPORTED_DATA_TYPES = ("int", *FP_DATA_TYPES, *(GGUF_DATA_TYPE_PREFIX + name for name in GGUF_TYPES))


def _group_key(group_size: Any) -> Any:
    """JSON gives FP8_BLOCK's (128, 128) back as a list: the hashable tuple."""
    return tuple(group_size) if isinstance(group_size, list) else group_size


def fp_format_of(spec: LayerSpec) -> str | None:
    """The quant.fp format of a floating-point spec's weights (``None`` for integer and GGUF grids)."""
    return FP_WEIGHT_FORMATS.get((spec.data_type, spec.bits, _group_key(spec.group_size)))


def act_quant_of(spec: LayerSpec) -> ActQuant | None:
    """How the spec quantizes activations (``None``: they stay in 16 bit)."""
    if spec.act_bits >= 16:
        return None
    return FP_ACT_FORMATS.get((spec.act_data_type, spec.act_bits, spec.act_group_size, spec.act_dynamic))


def gguf_type_of(data_type: str) -> GGUFType | None:
    """The GGUF block type a ``data_type`` such as ``"gguf:q4_k"`` names (``None`` for the integer grids)."""
    if not data_type.startswith(GGUF_DATA_TYPE_PREFIX):
        return None
    return GGUF_TYPES[data_type[len(GGUF_DATA_TYPE_PREFIX) :]]


def gguf_spec_fields(type_name: str) -> dict[str, Any]:
    """The LayerSpec fields of a GGUF block type: its code width, the weights sharing one scale (a legacy block or
    a K-quant's sub-block) and whether it stores a minimum (asymmetric) or a fixed code offset (symmetric)."""
    t = GGUF_TYPES[type_name]
    return {
        "bits": t.bits,
        "group_size": t.sub_block,
        "sym": not t.has_min,
        "data_type": GGUF_DATA_TYPE_PREFIX + t.name,
    }


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear layer is quantized: integer / GGUF grids weight-only, floating-point grids (``data_type``
    ``"mx_fp"``, ``"nv_fp"``, ``"fp"``) also with activations quantized (``act_*``, the reference's names)."""

    bits: int = 4
    group_size: int | tuple[int, int] = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16
    act_data_type: str = "float"
    act_group_size: int = 128
    act_dynamic: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_size", _group_key(self.group_size))
        if self.data_type not in SUPPORTED_DATA_TYPES:
            raise ValueError(f"data_type={self.data_type!r} is not supported; accepted: {list(SUPPORTED_DATA_TYPES)}")
        self._check_activations()
        if self.data_type in FP_DATA_TYPES:
            if fp_format_of(self) is None or self.sym is not True:
                accepted = [(dt, b, g) for dt, b, g in FP_WEIGHT_FORMATS if dt == self.data_type]
                raise ValueError(
                    f"data_type={self.data_type!r} with bits={self.bits!r}, group_size={self.group_size!r}, "
                    f"sym={self.sym!r} is not supported; accepted (data_type, bits, group_size), sym=True: {accepted}"
                )
            return
        gguf = gguf_type_of(self.data_type)
        if gguf is not None:  # a GGUF grid fixes the code width, the group and the symmetry
            fields = gguf_spec_fields(gguf.name)
            wrong = {k: getattr(self, k) for k in ("bits", "group_size", "sym") if getattr(self, k) != fields[k]}
            if wrong:
                raise ValueError(
                    f"data_type={self.data_type!r} stores bits={fields['bits']}, group_size={fields['group_size']}, "
                    f"sym={fields['sym']}; got {wrong}"
                )
        elif self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; accepted: {list(SUPPORTED_BITS)} (16 = keep unquantized)"
            )
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym={self.sym!r} is not supported; accepted: True or False")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; accepted: a positive integer or -1 (per channel)"
            )

    def _check_activations(self) -> None:
        if not isinstance(self.act_bits, int) or isinstance(self.act_bits, bool):
            raise ValueError(f"act_bits={self.act_bits!r} is not supported; accepted: an integer (16 = unquantized)")
        if self.act_bits >= 16:
            return
        if self.data_type not in FP_DATA_TYPES or act_quant_of(self) is None:
            accepted = [f"{k[0]}: bits={k[1]} group_size={k[2]} dynamic={k[3]}" for k in FP_ACT_FORMATS]
            raise ValueError(
                f"act_bits={self.act_bits} act_data_type={self.act_data_type!r} act_group_size={self.act_group_size!r} "
                f"act_dynamic={self.act_dynamic!r} with data_type={self.data_type!r} is not supported; activations are "
                f"quantized with floating-point weights only, as one of: {'; '.join(accepted)}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.group_size, tuple):
            out["group_size"] = list(self.group_size)  # JSON's form; LayerSpec(**d) makes it a tuple again
        return out


def _fp_scheme(
    data_type: str, bits: int, group_size: Any, act_data_type: str, act_bits: int, act_group_size: int, dynamic: bool
) -> dict[str, Any]:
    return {
        "bits": bits, "group_size": group_size, "sym": True, "data_type": data_type, "act_bits": act_bits,
        "act_data_type": act_data_type, "act_group_size": act_group_size, "act_dynamic": dynamic,
    }  # fmt: skip


# (data_type, bits, group_size, act_data_type, act_bits, act_group_size, act_dynamic) of the reference's fp schemes
_FP_SCHEMES: dict[str, tuple[Any, ...]] = {
    "MXFP4": ("mx_fp", 4, 32, "mx_fp", 4, 32, True),
    "MXFP4_RCEIL": ("mx_fp", 4, 32, "mx_fp_rceil", 4, 32, True),
    "MXFP8": ("mx_fp", 8, 32, "mx_fp", 8, 32, True),
    "MXFP8_RCEIL": ("mx_fp", 8, 32, "mx_fp_rceil", 8, 32, True),
    "NVFP4": ("nv_fp", 4, 16, "nv_fp4_with_static_gs", 4, 16, True),
    "FPW8A16": ("fp", 8, 0, "float", 16, 128, True),
    "FP8_STATIC": ("fp", 8, -1, "fp", 8, 0, False),
    "FP8_BLOCK": ("fp", 8, (128, 128), "fp", 8, 128, True),
}


# name -> fields of LayerSpec; ``None`` means "keep the layers in 16 bit" (BF16 scheme).
SCHEMES: dict[str, dict[str, Any] | None] = {
    "W4A16": {"bits": 4, "group_size": 128, "sym": True},
    "W8A16": {"bits": 8, "group_size": 128, "sym": True},
    "W3A16": {"bits": 3, "group_size": 128, "sym": True},
    "W2A16": {"bits": 2, "group_size": 128, "sym": True},
    "W2A16G64": {"bits": 2, "group_size": 64, "sym": True},
    "W2A16G32": {"bits": 2, "group_size": 32, "sym": True},
    "BF16": None,
    # Floating-point grids (the reference's definitions): MX = OCP microscaling, E8M0 scale per 32 (weights and,
    # dynamically, activations; _RCEIL rounds the activations' scale up); NVFP4 = E2M1 per 16 with E4M3 scales and a
    # per-tensor global scale (the activations' calibrated); FP8 with per-tensor (FPW8A16), per-channel weight +
    # static per-tensor activation (FP8_STATIC) or 128x128 weight + dynamic per-128 activation scales (FP8_BLOCK).
    **{name: _fp_scheme(*facts) for name, facts in _FP_SCHEMES.items()},
    # llama.cpp's file types (the reference's "gguf:q4_k_m" names): the default spec is the mixture's base type;
    # planning gives each tensor the type llama-quantize would (quant.gguf_mixtures).
    **{GGUF_SCHEME_PREFIX + name.upper(): gguf_spec_fields(m.base) for name, m in MIXTURES.items()},
}


def gguf_mixture_of(scheme: str) -> str | None:
    """The llama.cpp file type a scheme or format name such as ``"GGUF:Q4_K_M"`` / ``"gguf:q4_k_m"`` names
    (``None`` when it names no GGUF type)."""
    if not scheme.lower().startswith(GGUF_SCHEME_PREFIX.lower()):
        return None
    name = scheme[len(GGUF_SCHEME_PREFIX) :].lower()
    return name if name in MIXTURES else None


def scheme_names() -> list[str]:
    return list(SCHEMES)


def scheme_fields(name: str) -> dict[str, Any] | None:
    """The LayerSpec fields of a named scheme (case-insensitive); an unknown name lists the accepted ones."""
    key = name.upper()
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; accepted: {', '.join(SCHEMES)}")
    fields = SCHEMES[key]
    return None if fields is None else dict(fields)


LAYER_SPEC_KEYS = tuple(f.name for f in dataclass_fields(LayerSpec))


KEEP_16_BIT: dict[str, Any] = {"bits": 16}


def layer_override(value: Any) -> dict[str, Any]:
    """A layer_config value -> LayerSpec field overrides.

    Accepted, as in the reference: a scheme name (``"W8A16"``; ``"BF16"`` keeps the layer in 16 bit), the integer
    ``16`` (keep in 16 bit), or a dict of LayerSpec fields (``{"bits": 16}`` keeps the layer in 16 bit).
    """
    if isinstance(value, str):
        fields = scheme_fields(value)
        return dict(KEEP_16_BIT) if fields is None else fields
    if isinstance(value, int) and not isinstance(value, bool) and value == 16:
        return dict(KEEP_16_BIT)
    if not isinstance(value, Mapping):
        raise ValueError(
            f"layer_config values must be a scheme name ({', '.join(SCHEMES)}), 16 (keep unquantized) or a dict of "
            f"{LAYER_SPEC_KEYS}, got {value!r}"
        )
    unknown = set(value) - set(LAYER_SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown layer_config keys {sorted(unknown)}; accepted: {list(LAYER_SPEC_KEYS)}")
    bits = value.get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)):
        raise ValueError(
            f"layer_config bits={bits!r} is not supported; accepted: {list(SUPPORTED_BITS)} or 16 (keep unquantized)"
        )
    gguf = gguf_type_of(value["data_type"]) if isinstance(value.get("data_type"), str) else None
    if gguf is not None and not keeps_16_bit(value):  # the type fixes bits / group / symmetry
        return {**gguf_spec_fields(gguf.name), **value}
    return dict(value)


def keeps_16_bit(override: Mapping[str, Any]) -> bool:
    """Whether a parsed layer_config value leaves its layers unquantized."""
    return override.get("bits", 0) >= 16


# What makes a key a regular expression rather than a name fragment (the reference's heuristic, plus ``\`` and ``{``).
_REGEX_TOKENS = (".*", "^", "$", "|", "(", ")", "[", "]", "?", "+", "\\", "{")


@functools.lru_cache(maxsize=4096)
def _key_regexes(key: str) -> tuple[re.Pattern[str], ...]:
    """The ways a layer_config key reads, each searched in layer names (``re.search``) as the reference does.

    A key with regex tokens (``"model.layers.*k_proj"``, ``"layers[.][0-3][.]"``, ``"(q|v)_proj$"``) is a regular
    expression; any other key is a literal name fragment (``"k_proj"``; ``"layers.1."`` does not find
    ``layers.10``).  A ``*`` / ``?`` also reads as a shell wildcard (``"*.self_attn.k_proj"`` is no valid regex).
    Cached: planning asks every key about every layer name.
    """
    readings = [key if any(token in key for token in _REGEX_TOKENS) else re.escape(key)]
    if "*" in key or "?" in key:
        readings.append(re.escape(key).replace(r"\*", ".*").replace(r"\?", "."))
    out = []
    for reading in readings:
        try:
            out.append(re.compile(reading))
        except re.error:
            out.append(re.compile(re.escape(key)))  # not a valid regex after all: a literal fragment
    return tuple(out)


def key_matches(key: str, name: str) -> bool:
    """Whether a ``layer_config`` / ``extra_config`` key names layer ``name``: exact, fragment, wildcard or regex.

    One function for planning and for loading checkpoints, so a saved ``extra_config`` reads back the way the
    reference's loader reads it (``re.search`` of each key in each layer name).
    """
    return key == name or any(regex.search(name) for regex in _key_regexes(key))


def _closest_names(key: str, names: list[str], n: int = 5) -> list[str]:
    """Layer names (or their dotted tails, for fragment keys such as ``"k_prj"``) that look like ``key``."""
    tails = {".".join(parts[i:]) for parts in (name.split(".") for name in names) for i in range(1, len(parts))}
    pool = list(dict.fromkeys([*names, *sorted(t for t in tails if not t[0].isdigit())]))
    return difflib.get_close_matches(key, pool, n=n, cutoff=0.6)


def _check_keys(
    keys: Mapping[str, dict[str, Any]], names: list[str], exact: set[str], other_layers: Mapping[str, str]
) -> None:
    """``resolve_plan(strict_keys=True)``: every key must name at least one layer; why not, and what is close."""
    for key, override in keys.items():
        if key in exact or any(key_matches(key, name) for name in names):
            continue
        others = {name: why for name, why in other_layers.items() if key_matches(key, name)}
        if others and keeps_16_bit(override):
            continue  # e.g. ignore_layers="lm_head" while the head is not quantized anyway
        if others:
            listed = "; ".join(f"{name}: {why}" if why else name for name, why in list(others.items())[:5])
            raise ValueError(
                f"layer_config[{key!r}] asks to quantize layers that are not quantization candidates ({listed}); "
                "quant_lm_head=True quantizes the output head, to_quant_block_names chooses the block lists"
            )
        close = _closest_names(key, [*names, *other_layers])
        hint = f"closest: {close}" if close else f"layers look like {names[:3]}"
        raise ValueError(
            f"layer_config key {key!r} matches no layer of this model ({hint}); keys are exact names, name "
            "fragments, shell wildcards or regular expressions searched in the layer names"
        )


@dataclass
class SkippedLayer:
    name: str
    reason: str


@dataclass
class QuantPlan:
    """Which layers get quantized, and how; layers left in 16 bit are absent from ``layers``.

    Every candidate is in exactly one of ``layers``, ``skipped`` (the format or shape refused it: warned about)
    and ``kept`` (16 bit on request: a ``layer_config`` / ``ignore_layers`` entry, or a 16-bit default).  A
    checkpoint's ``extra_config`` must list ``skipped`` and ``kept`` as ``{"bits": 16}``, or loaders that trust the
    default expect packed tensors for them.
    """

    layers: dict[str, LayerSpec] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    default: LayerSpec | None = None
    kept: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, dict[str, Any]]:
        """Per-layer differences from ``default`` (for a checkpoint's ``extra_config``)."""
        if self.default is None:
            return {name: spec.to_dict() for name, spec in self.layers.items()}
        base = self.default.to_dict()
        out = {}
        for name, spec in self.layers.items():
            diff = {k: v for k, v in spec.to_dict().items() if base[k] != v}
            if diff:
                out[name] = diff
        return out


def resolve_plan(
    candidates: Iterable[tuple[str, int, int]],
    default: LayerSpec | None,
    layer_config: Mapping[str, Any] | None = None,
    can_hold: Callable[[LayerSpec, int, int], str | None] | None = None,
    strict_keys: bool = False,
    other_layers: Mapping[str, str] | Iterable[str] = (),
) -> QuantPlan:
    """Build the plan from candidate layers ``(name, in_features, out_features)``.

    Which ``layer_config`` entry applies to a layer: the key equal to its name, else the first key in dict order
    that matches it (``key_matches``: fragment, wildcard or regex; the reference's loader also keeps the first
    match).  A key equal to some candidate's name is only that exact name, never a pattern for the others.
    ``can_hold`` is the target format's shape check; a layer it refuses stays in 16 bit, with the reason kept
    in ``skipped``.

    ``strict_keys=True`` (planning a quantization) makes a key that matches no candidate a ``ValueError`` listing
    the closest names; ``other_layers`` are the model's layers that are not candidates (an unquantized ``lm_head``,
    layers outside the blocks), as names or ``{name: why}``: keys naming only those are accepted when they keep
    16 bit, and refused (with the why) when they ask for quantization.  Loading a checkpoint leaves
    ``strict_keys`` False: its ``extra_config`` may name layers this model lacks (e.g. an untied lm_head).
    """
    candidates = list(candidates)
    names = [name for name, _, _ in candidates]
    parsed = {key: layer_override(value) for key, value in dict(layer_config or {}).items()}
    exact = set(parsed) & set(names)
    patterns = [key for key in parsed if key not in exact]
    if strict_keys:
        others = other_layers if isinstance(other_layers, Mapping) else dict.fromkeys(other_layers, "")
        _check_keys(parsed, names, exact, others)
    plan = QuantPlan(default=default)
    for name, in_features, out_features in candidates:
        fields = None if default is None else default.to_dict()
        key = name if name in exact else next((p for p in patterns if key_matches(p, name)), None)
        if key is not None:
            override = parsed[key]
            fields = None if keeps_16_bit(override) else {**(fields or LayerSpec().to_dict()), **override}
        if fields is None:
            plan.kept.append(name)
            continue
        spec = LayerSpec(**fields)
        if reason := _group_reason(spec, in_features):
            plan.skipped.append(SkippedLayer(name, reason))
            continue
        reason = can_hold(spec, in_features, out_features) if can_hold else None
        if reason:
            plan.skipped.append(SkippedLayer(name, reason))
            continue
        plan.layers[name] = spec
    return plan


def _group_reason(spec: LayerSpec, in_features: int) -> str | None:
    """Why ``in_features`` does not split into the spec's groups (integer / GGUF groups, fp blocks), or None."""
    if fp_format_of(spec) is not None:  # MX / NV blocks (weights and activations alike) must be whole; fp8's not
        whole = spec.group_size if spec.data_type in ("mx_fp", "nv_fp") else 1
        return f"in_features={in_features} not divisible by group_size={whole}" if in_features % whole else None
    gs = in_features if spec.group_size == -1 else spec.group_size
    return f"in_features={in_features} not divisible by group_size={gs}" if in_features % gs else None


def with_overrides(spec: LayerSpec, **fields: Any) -> LayerSpec:
    return replace(spec, **fields)
