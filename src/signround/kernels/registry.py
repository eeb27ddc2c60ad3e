"""Backend descriptors and the one selector over them.

Each backend is a frozen :class:`Backend` declaring what it can run (devices, bits, group sizes, symmetry,
packing formats, activation dtypes, shape divisibility, required packages) plus its QuantLinear class.
:func:`select` filters the descriptors with one function, :meth:`Backend.reject_reason`, and returns the
highest-priority usable one; when none is usable, or a requested one is not, the error lists why each candidate
was rejected.  Backend names appear nowhere else: a new kernel is a new module calling :func:`register_backend`.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from packaging.requirements import Requirement

from ..packing import get_packer
from ..schemes import LayerSpec
from .base import QuantLinear

__all__ = [
    "Backend",
    "backend_names",
    "candidates",
    "device_present",
    "get_backend",
    "missing_requirement",
    "register_backend",
    "select",
]

logger = logging.getLogger(__name__)

_BACKENDS: dict[str, Backend] = {}


@cache
def missing_requirement(requirement: str) -> str | None:
    """``None`` if the pip ``requirement`` (e.g. ``"gptqmodel>=2.0"``) is installed, else why not (with the pip line)."""
    req = Requirement(requirement)
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return f"needs {requirement!r}, which is not installed (pip install '{requirement}')"
    if req.specifier and not req.specifier.contains(installed, prereleases=True):
        return f"needs {requirement!r}, found {req.name}=={installed} (pip install -U '{requirement}')"
    return None


@dataclass(frozen=True)
class Backend:
    """What one kernel can run.  ``None`` in ``group_sizes`` / ``packings`` means "any"."""

    name: str
    quant_linear: type[QuantLinear]
    devices: tuple[str, ...]
    bits: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    packings: tuple[str, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    sym: tuple[bool, ...] = (True, False)
    data_types: tuple[str, ...] = ("int",)
    priority: int = 0  # higher wins; the torch reference is 0
    requires: tuple[str, ...] = ()  # pip requirement strings, checked lazily
    in_features_multiple: int = 1
    out_features_multiple: int = 1
    check: Callable[[LayerSpec, int, int], str | None] | None = None  # per-layer limits the fields cannot say
    # whether this machine's software can run the kernel at all (a vendor stack that fails to import, an op this
    # torch lacks); checked after ``requires``, so it may import the required package
    environment: Callable[[], str | None] | None = None

    def availability(self) -> str | None:
        """``None`` if the packages and software stack are there, else why not (layer-independent)."""
        for requirement in self.requires:
            if reason := missing_requirement(requirement):
                return reason
        if self.environment is None:
            return None
        with torch.device("cpu"):  # selection runs inside from_pretrained's meta-device context: probe on real memory
            return self.environment()

    def devices_here(self) -> list[str]:
        """The backend's device types that this machine has."""
        return [d for d in self.devices if device_present(d)]

    def reject_reason(
        self,
        spec: LayerSpec,
        packing: str,
        device: str | torch.device,
        dtype: torch.dtype,
        in_features: int,
        out_features: int,
    ) -> str | None:
        """``None`` if this backend can run the layer, else the first reason it cannot (names value and accepted)."""
        device_type = torch.device(device).type
        checks = (
            (device_type in self.devices, f"device {device_type!r} not in {list(self.devices)}"),
            (spec.data_type in self.data_types, f"data_type={spec.data_type!r} not in {list(self.data_types)}"),
            (spec.bits in self.bits, f"bits={spec.bits} not in {list(self.bits)}"),
            (
                self.group_sizes is None or spec.group_size in self.group_sizes,
                f"group_size={spec.group_size} not in {list(self.group_sizes or ())}",
            ),
            (spec.sym in self.sym, f"sym={spec.sym} not supported (supports sym in {list(self.sym)})"),
            (
                self.packings is None or packing in self.packings,
                f"packing {packing!r} not in {list(self.packings or ())}",
            ),
            (dtype in self.dtypes, f"activation dtype {dtype} not in {[str(d) for d in self.dtypes]}"),
            (
                in_features % self.in_features_multiple == 0,
                f"in_features={in_features} is not a multiple of {self.in_features_multiple}",
            ),
            (
                out_features % self.out_features_multiple == 0,
                f"out_features={out_features} is not a multiple of {self.out_features_multiple}",
            ),
        )
        for ok, reason in checks:
            if not ok:
                return reason
        if reason := _packing_reason(spec, packing, in_features, out_features):
            return reason
        if self.check is not None and (reason := self.check(spec, in_features, out_features)):
            return reason
        return self.availability()


def device_present(device_type: str) -> bool:
    """Whether this machine has a ``device_type`` device that torch can use."""
    if device_type == "cpu":
        return True
    module = getattr(torch, device_type, None)
    is_available = getattr(module, "is_available", None)
    try:
        return bool(is_available()) if callable(is_available) else False
    except Exception:  # vendor stacks raise instead of returning False when their driver is absent
        return False


def _packing_reason(spec: LayerSpec, packing: str, in_features: int, out_features: int) -> str | None:
    """Why the packing cannot describe the layer (unknown name, shape the layout cannot hold), or None."""
    try:
        get_packer(packing).tensor_shapes_dtypes(spec, in_features, out_features)
    except ValueError as err:
        return str(err)
    return None


def register_backend(backend: Backend) -> Backend:
    """Add a backend descriptor; a second registration under the same name is an error."""
    if backend.name in _BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; registered: {', '.join(backend_names()) or '(none)'}")
    return _BACKENDS[name]


def candidates(
    spec: LayerSpec,
    packing: str,
    device: str | torch.device,
    dtype: torch.dtype,
    in_features: int,
    out_features: int,
) -> list[tuple[Backend, str | None]]:
    """Every registered backend, best first, with why it cannot run the layer (``None`` = usable)."""
    ordered = sorted(_BACKENDS.values(), key=lambda b: (-b.priority, b.name))
    return [(b, b.reject_reason(spec, packing, device, dtype, in_features, out_features)) for b in ordered]


def _layer_description(spec: LayerSpec, packing: str, device, dtype, in_features: int, out_features: int) -> str:
    return (
        f"bits={spec.bits} group_size={spec.group_size} sym={spec.sym} packing={packing!r} device={device!s} "
        f"dtype={dtype} in_features={in_features} out_features={out_features}"
    )


# How an availability reason says that installing something would fix it (a package, the CUDA toolkit GPTQModel's
# build needs, a C compiler for native).  Only those reasons become hints: a GPU too old or ROCm do not.
_INSTALL_PHRASES = ("pip install", "install the CUDA toolkit", "install a C compiler")


def _install_hint(ranked: list[tuple[Backend, str | None]], chosen: Backend) -> str:
    """Name the best backend above ``chosen`` that only lacks something installable (availability is checked
    last, so such a reason means every layer check passed), with the reason; empty if there is none."""
    for backend, reason in ranked:
        if backend.priority <= chosen.priority:
            break
        if reason and any(phrase in reason for phrase in _INSTALL_PHRASES):
            return f"; faster if installed: {backend.name} ({reason})"
    return ""


@cache
def _log_choice_once(message: str) -> None:
    logger.info(message)


def select(
    spec: LayerSpec,
    packing: str,
    device: str | torch.device,
    dtype: torch.dtype,
    in_features: int,
    out_features: int,
    requested: str | None = None,
) -> Backend:
    """The backend to run one layer: ``requested`` if given (an error says why it cannot), else the
    highest-priority usable one.  Explains the choice at INFO level (once per distinct explanation), including
    faster backends that only lack a package."""
    what = _layer_description(spec, packing, device, dtype, in_features, out_features)
    if requested is not None:
        backend = get_backend(requested)
        reason = backend.reject_reason(spec, packing, device, dtype, in_features, out_features)
        if reason is not None:
            raise ValueError(f"backend {requested!r} cannot run the layer ({what}): {reason}")
        return backend
    ranked = candidates(spec, packing, device, dtype, in_features, out_features)
    usable = [b for b, reason in ranked if reason is None]
    if not usable:
        lines = "\n".join(f"  {b.name}: {reason}" for b, reason in ranked) or "  (no backend registered)"
        raise ValueError(f"no kernel backend can run the layer ({what}); rejected:\n{lines}")
    chosen = usable[0]
    hint = _install_hint(ranked, chosen)
    # one line per distinct choice (not per layer shape)
    kind = f"bits={spec.bits} group_size={spec.group_size} sym={spec.sym} packing={packing!r} device={device!s} dtype={dtype}"
    _log_choice_once(f"kernel backend {chosen.name!r} for {kind}{hint}")
    return chosen
