"""The Packer contract and the name -> Packer registry.

A Packer turns one layer's :class:`~signround.quant.int.QuantizedTensor` into the named tensors a checkpoint
format stores (and back), and writes / reads that format's ``config.json["quantization_config"]`` body.
Packers never run a model and never touch files: exporters and loaders do the I/O and call these pure
functions, so every format can be tested alone (``unpack(pack(q)) == q``).

Names are the on-disk ``packing_format`` strings (``"auto_round:auto_gptq"``, ...), looked up with
:func:`get_packer`; an unknown name lists every registered one.  Adding a format = one new module with one
decorated class; nothing else is edited.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import torch

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LayerSpec

__all__ = [
    "Packer",
    "TensorLayout",
    "get_packer",
    "packer_names",
    "register_packer",
]

# tensor name (relative to the layer) -> (shape, dtype)
TensorLayout = dict[str, tuple[tuple[int, ...], torch.dtype]]

_PACKERS: dict[str, Packer] = {}
_ALIASES: dict[str, str] = {}


class Packer(ABC):
    """One checkpoint layout.  Instances are stateless; the registry holds one instance per name."""

    name: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()
    # tensors of which every packed layer stores one: loaders find the packed layers by them (empty: the first of
    # ``tensor_names``); needed where layers store different tensors (FP8's ``weight_scale`` / ``weight_scale_inv``)
    marker_tensors: ClassVar[tuple[str, ...]] = ()
    per_layer_specs: ClassVar[bool] = True  # False: one spec per model (layers may only be kept unquantized)

    @abstractmethod
    def can_hold(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        """``None`` if this layout can store a layer of that shape and spec, else the reason (names the bad value).

        Planning calls this before tuning so a layer the format cannot hold stays in 16 bit, with the reason
        recorded, instead of failing at save time.
        """

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        """The shape-independent part of :meth:`can_hold` (bits, data type, symmetry): lets a config be validated
        before any layer is seen."""
        return None

    def can_load(self, spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        """Like :meth:`can_hold`, for *reading* a checkpoint: a format may read layers it refuses to write (a
        convention its other readers get wrong).  Loaders plan with this, exporters with :meth:`can_hold`."""
        return self.can_hold(spec, in_features, out_features)

    @abstractmethod
    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        """Shape and dtype of every stored tensor: used to build empty (meta) buffers before a checkpoint is
        loaded into them, and to validate what was loaded."""

    @abstractmethod
    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The layer's stored tensors (names relative to the layer, e.g. ``"qweight"``).  Does not modify ``qt``."""

    @abstractmethod
    def unpack(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> QuantizedTensor:
        """Inverse of :meth:`pack`; raises ``ValueError`` naming a missing or mis-shaped tensor.

        The torch backend calls this on every forward, so it reads shapes and dtypes only, never a stored value on
        the host: a read would synchronise the GPU each call and cannot be captured in a CUDA graph.  Checks of
        stored values go in :meth:`check_values`, which loaders call once."""

    def check_values(  # noqa: B027 - an optional hook: most layouts store no value to check
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> None:
        """Raise ``ValueError`` when a stored value says the layer is not what this packer unpacks (a permuted
        ``g_idx``, a ``weight_shape`` of another layer).  Reads values on the host, so it runs once per layer at
        load (``QuantLinear.check_loaded``), not per forward; meta tensors are skipped.  Default: nothing to check."""

    @abstractmethod
    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The ``config.json["quantization_config"]`` body for this format (JSON values only).

        :param default: the model-wide spec.
        :param overrides: layer name -> the LayerSpec fields that differ from ``default``; ``{"bits": 16}``
            (or more) marks a layer kept unquantized.
        :param extra: format-specific metadata (tuning knobs, block names, tool version ...).
        """

    @abstractmethod
    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        """Inverse of :meth:`quantization_config`: ``(default spec, overrides)`` with the same conventions."""

    def resolve(self, default: LayerSpec) -> Packer:
        """The concrete on-disk variant of this format for a model whose model-wide spec is ``default``.

        Exporters call ``get_packer(format).resolve(default)`` once per model: some formats store one
        convention per checkpoint (e.g. auto_round's zero-point offset follows the model's symmetry).
        """
        return self

    @staticmethod
    def group_reason(spec: LayerSpec, in_features: int) -> str | None:
        """Why ``in_features`` does not split into whole groups of ``spec.group_size``, or None."""
        if in_features % effective_group_size(spec.group_size, in_features):
            return f"in_features={in_features} is not divisible by group_size={spec.group_size}"
        return None

    def described_groups(self, reason: str | None, spec: LayerSpec, in_features: int) -> int:
        """The layer's group count for :meth:`tensor_shapes_dtypes`; raises with ``reason`` if the layout cannot
        describe the layer."""
        if reason is not None:
            raise ValueError(f"packing {self.name!r} cannot describe this layer: {reason}")
        return in_features // effective_group_size(spec.group_size, in_features)

    def check_tensors(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> None:
        """Raise ``ValueError`` naming the first tensor of the layout that is missing or of the wrong shape / dtype
        (unpackers call this first)."""
        for name, (shape, dtype) in self.tensor_shapes_dtypes(spec, in_features, out_features).items():
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"packing {self.name!r}: tensor {name!r} is missing (have {sorted(tensors)})")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(
                    f"packing {self.name!r}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
                )

    def check_holds(self, spec: LayerSpec, in_features: int, out_features: int) -> None:
        """Raise ``ValueError`` with :meth:`can_hold`'s reason when the layer does not fit."""
        reason = self.can_hold(spec, in_features, out_features)
        if reason is not None:
            raise ValueError(f"packing {self.name!r} cannot hold this layer: {reason}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


P = TypeVar("P", bound=type[Packer])


def register_packer(name: str, *aliases: str) -> Callable[[P], P]:
    """Class decorator: instantiate the Packer and register it under ``name`` (its ``packing_format``) and aliases."""

    def decorate(cls: P) -> P:
        for key in (name, *aliases):
            if key in _PACKERS or key in _ALIASES:
                raise ValueError(f"packing format {key!r} is already registered (by {get_packer(key)!r})")
        cls.name = name
        _PACKERS[name] = cls()
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorate


def packer_names() -> list[str]:
    """Every registered name and alias, sorted."""
    return sorted([*_PACKERS, *_ALIASES])


def get_packer(name: str) -> Packer:
    """The registered Packer for ``name`` (or an alias); an unknown name lists every registered one."""
    key = _ALIASES.get(name, name)
    if key not in _PACKERS:
        raise ValueError(f"unknown packing format {name!r}; registered: {', '.join(packer_names()) or '(none)'}")
    return _PACKERS[key]


# User-facing export format (``format="auto_round"``) -> the packer family that writes it.  A family's
# ``resolve(default)`` picks the concrete on-disk variant for the model's default spec.
EXPORT_FORMATS: dict[str, str] = {
    "auto_round": "auto_round",
    "auto_gptq": "gptq",
    "auto_awq": "awq_gemm",
    "llm_compressor": "pack-quantized",
}


def format_packer(format_name: str, default: LayerSpec | None = None) -> Packer:
    """The Packer writing export format ``format_name``; an unknown format lists the accepted ones."""
    key = format_name.strip().lower()
    if key not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {format_name!r}; accepted: {', '.join(EXPORT_FORMATS)}, gguf:<type>")
    packer = get_packer(EXPORT_FORMATS[key])
    return packer.resolve(default) if default is not None else packer
