"""Quantization schemes (named presets) and their resolution into a per-layer ``QuantPlan``.

``LayerSpec`` is the single description of how one layer is quantized; every later stage (tuning,
packing, kernels) reads it and nothing re-derives bits / group size / symmetry from strings.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_DATA_TYPES = ("int",)


@dataclass(frozen=True)
class LayerSpec:
    """How one Linear layer is quantized (weight-only integer quantization for now)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    data_type: str = "int"
    act_bits: int = 16

    def __post_init__(self) -> None:
        if self.data_type not in SUPPORTED_DATA_TYPES:
            raise ValueError(f"data_type={self.data_type!r} is not supported; accepted: {list(SUPPORTED_DATA_TYPES)}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; accepted: {list(SUPPORTED_BITS)} (16 = keep unquantized)"
            )
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym={self.sym!r} is not supported; accepted: True or False")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; accepted: a positive integer or -1 (per channel)"
            )
        if self.act_bits != 16:
            raise ValueError(
                f"act_bits={self.act_bits!r} is not supported; only weight-only quantization (act_bits=16)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# name -> fields of LayerSpec; ``None`` means "keep the layers in 16 bit" (BF16 scheme).
SCHEMES: dict[str, dict[str, Any] | None] = {
    "W4A16": {"bits": 4, "group_size": 128, "sym": True},
    "W8A16": {"bits": 8, "group_size": 128, "sym": True},
    "W3A16": {"bits": 3, "group_size": 128, "sym": True},
    "W2A16": {"bits": 2, "group_size": 128, "sym": True},
    "W2A16G64": {"bits": 2, "group_size": 64, "sym": True},
    "W2A16G32": {"bits": 2, "group_size": 32, "sym": True},
    "BF16": None,
}


def scheme_names() -> list[str]:
    return list(SCHEMES)


def scheme_fields(name: str) -> dict[str, Any] | None:
    """The LayerSpec fields of a named scheme (case-insensitive); an unknown name lists the accepted ones."""
    key = name.upper()
    if key not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; accepted: {', '.join(SCHEMES)}")
    fields = SCHEMES[key]
    return None if fields is None else dict(fields)


LAYER_SPEC_KEYS = ("bits", "group_size", "sym", "data_type", "act_bits")


def layer_override(value: Any) -> dict[str, Any]:
    """A layer_config value -> LayerSpec field overrides (a scheme name or a dict of fields)."""
    if isinstance(value, str):
        fields = scheme_fields(value)
        return {"bits": 16} if fields is None else fields
    if not isinstance(value, Mapping):
        raise ValueError(f"layer_config values must be a scheme name or a dict of {LAYER_SPEC_KEYS}, got {value!r}")
    unknown = set(value) - set(LAYER_SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown layer_config keys {sorted(unknown)}; accepted: {list(LAYER_SPEC_KEYS)}")
    bits = value.get("bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)):
        raise ValueError(
            f"layer_config bits={bits!r} is not supported; accepted: {list(SUPPORTED_BITS)} or 16 (keep unquantized)"
        )
    return dict(value)


def _pattern_matches(pattern: str, name: str) -> bool:
    """Exact name, shell-style wildcard (``*k_proj``) or a regular expression matching the whole name."""
    if pattern == name:
        return True
    if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        if re.fullmatch(pattern, name):
            return True
    except re.error:
        return False
    return False


@dataclass
class SkippedLayer:
    name: str
    reason: str


@dataclass
class QuantPlan:
    """Which layers get quantized, and how; layers left in 16 bit are absent from ``layers``."""

    layers: dict[str, LayerSpec] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    default: LayerSpec | None = None

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
) -> QuantPlan:
    """Build the plan from candidate layers ``(name, in_features, out_features)``.

    ``layer_config`` overrides apply in order: exact names first, then patterns.  ``can_hold`` is the
    target format's shape check; a layer it refuses stays in 16 bit, with the reason kept in ``skipped``.
    """
    layer_config = dict(layer_config or {})
    parsed = {pattern: layer_override(value) for pattern, value in layer_config.items()}
    plan = QuantPlan(default=default)
    for name, in_features, out_features in candidates:
        fields = None if default is None else default.to_dict()
        matched = [p for p in parsed if p == name] or [p for p in parsed if _pattern_matches(p, name)]
        for pattern in matched[:1]:
            override = parsed[pattern]
            fields = None if override.get("bits", 0) >= 16 else {**(fields or LayerSpec().to_dict()), **override}
        if fields is None:
            continue
        spec = LayerSpec(**fields)
        gs = in_features if spec.group_size == -1 else spec.group_size
        if in_features % gs:
            plan.skipped.append(SkippedLayer(name, f"in_features={in_features} not divisible by group_size={gs}"))
            continue
        reason = can_hold(spec, in_features, out_features) if can_hold else None
        if reason:
            plan.skipped.append(SkippedLayer(name, reason))
            continue
        plan.layers[name] = spec
    return plan


def with_overrides(spec: LayerSpec, **fields: Any) -> LayerSpec:
    return replace(spec, **fields)
