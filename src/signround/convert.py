"""A checkpoint's ``quantization_config`` -> the Packer that reads its tensors, the default LayerSpec and overrides.

Loading goes through here for every format: signround's and Intel's auto-round, GPTQ (v1 / v2), AWQ GEMM and
compressed-tensors ``pack-quantized``.  Each quant_method maps to a function naming the on-disk packing; the
Packer then parses the rest of the config (its own keys, per-layer overrides), so this module holds no format
knowledge beyond that table.  Anything unknown fails here, naming what is accepted, before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .packing import Packer, get_packer
from .schemes import LayerSpec

__all__ = ["CHECKPOINT_METHODS", "CheckpointFormat", "read_checkpoint_config"]


def _auto_round_packing(cfg: Mapping[str, Any]) -> str:
    if cfg.get("data_type") == "fp" and not cfg.get("packing_format"):  # the reference's FPW8A16 names none
        return "auto_round:fp8"
    return cfg.get("packing_format") or "auto_round:auto_gptq"


def _gptq_packing(cfg: Mapping[str, Any]) -> str:
    return cfg.get("checkpoint_format") or cfg.get("format") or "gptq"


def _awq_packing(cfg: Mapping[str, Any]) -> str:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version={version!r} is not loaded; accepted: 'gemm'")
    return "awq_gemm"


def _compressed_tensors_packing(cfg: Mapping[str, Any]) -> str:
    return cfg.get("format") or "pack-quantized"


# quant_method -> the packing (Packer name) its checkpoints use
CHECKPOINT_METHODS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "auto-round": _auto_round_packing,
    "intel/auto-round": _auto_round_packing,
    "gptq": _gptq_packing,
    "awq": _awq_packing,
    "compressed-tensors": _compressed_tensors_packing,
}


@dataclass(frozen=True)
class CheckpointFormat:
    """How a packed checkpoint is laid out: its Packer, the model-wide spec and per-layer overrides."""

    packer: Packer
    default: LayerSpec
    overrides: dict[str, dict[str, Any]]


def read_checkpoint_config(description: Mapping[str, Any]) -> CheckpointFormat:
    """Parse a checkpoint's quantization_config; raises ``ValueError`` naming the problem and what is accepted."""
    method = description.get("quant_method")
    if method not in CHECKPOINT_METHODS:
        raise ValueError(f"signround cannot load quant_method={method!r}; accepted: {sorted(CHECKPOINT_METHODS)}")
    packing = CHECKPOINT_METHODS[method](description)
    try:
        packer = get_packer(packing)
    except ValueError as err:
        raise ValueError(f"{method} checkpoint with packing {packing!r}: {err}") from err
    default, overrides = packer.parse_config(description)
    return CheckpointFormat(packer, default, overrides)
