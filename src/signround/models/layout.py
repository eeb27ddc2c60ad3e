"""Where a model keeps what SignRound quantizes: decoder blocks, their Linear-like layers, routers, towers, head.

:func:`inventory` accounts for every Linear-like weight of a model (``nn.Linear``, ``Conv1D``, fused experts):
each is a candidate for quantization or kept in 16 bit with its reason, so a run can never quietly leave most
of a model unquantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .conv1d import features, is_linear_like
from .experts import find_fused_experts, unsupported_reason
from .families import FINAL_NORM_PATHS, NONTEXT_BLOCK_PATHS, NONTEXT_PREFIXES, ROUTER_LEAF_NAMES, TEXT_BLOCK_PATHS

# Why an output head is not among the tuned layers by default.  Formats that store it anyway (GGUF: llama-quantize
# gives the output its recipe type) read this to tell it from a head the user kept in 16 bit.
HEAD_NOT_TUNED = "lm_head (quant_lm_head=False)"


def _module_list(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        return None
    return blocks if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks and their path (e.g. ``model.layers``)."""
    for path in TEXT_BLOCK_PATHS:
        blocks = _module_list(model, path)
        if blocks is not None:
            return path, blocks
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}; looked for {list(TEXT_BLOCK_PATHS)}. "
        "Pass to_quant_block_names='<path of its nn.ModuleList of blocks>' or add the path to "
        "signround.models.families.TEXT_BLOCK_PATHS."
    )


def nontext_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Block lists of vision / audio towers present in ``model``."""
    found = []
    for path in NONTEXT_BLOCK_PATHS:
        blocks = _module_list(model, path)
        if blocks is not None:
            found.append((path, blocks))
    return found


def block_lists(
    model: nn.Module, to_quant_block_names: Sequence[str] | None = None, quant_nontext_module: bool = False
) -> list[tuple[str, nn.ModuleList]]:
    """The block lists to quantize, in order: the user's, else the text decoder (+ the towers when asked)."""
    if to_quant_block_names:
        out = []
        for path in to_quant_block_names:
            blocks = _module_list(model, path)
            if blocks is None:
                raise ValueError(
                    f"to_quant_block_names: {path!r} is not a non-empty nn.ModuleList of {type(model).__name__}"
                )
            out.append((path, blocks))
        return out
    lists = [find_blocks(model)]
    if quant_nontext_module:
        lists = nontext_blocks(model) + lists
    return lists


def head_name(model: nn.Module) -> str | None:
    """Name of the output projection (lm_head) when it is an nn.Linear, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def text_config(model: nn.Module) -> Any:
    """The config of the text model (a VLM's ``text_config``; the model's own config otherwise)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def head_is_tied(model: nn.Module) -> bool:
    """Whether the output head shares the input embedding table: the config's word, not tensor identity
    (offloading, ``low_cpu_mem_usage``, loads the two as separate tensors)."""
    config = text_config(model)
    has_both = model.get_output_embeddings() is not None and model.get_input_embeddings() is not None
    return bool(getattr(config, "tie_word_embeddings", False)) and has_both


def final_norm(model: nn.Module) -> nn.Module | None:
    for path in FINAL_NORM_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


def is_router(model: nn.Module, name: str) -> bool:
    """A routing layer of a mixture-of-experts block: ``<moe>.gate``, ``<moe>.router`` or a layer inside one
    (Granite-MoE's ``router.layer``), where ``<moe>`` holds experts."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] not in ROUTER_LEAF_NAMES:
            continue
        try:
            if hasattr(model.get_submodule(".".join(parts[:i])), "experts"):
                return True
        except AttributeError:
            continue
    return False


@dataclass
class Inventory:
    """Every Linear-like weight of a model: candidates ``(name, in, out)`` and kept ``name -> reason``."""

    candidates: list[tuple[str, int, int]] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)  # weight elements per layer (candidates and kept)


def inventory(
    model: nn.Module,
    include_lm_head: bool = False,
    to_quant_block_names: Sequence[str] | None = None,
    quant_nontext_module: bool = False,
) -> Inventory:
    """Candidates inside the quantized block lists (+ lm_head when asked); everything else kept, with why."""
    inv = Inventory()
    lists = block_lists(model, to_quant_block_names, quant_nontext_module)
    prefixes = tuple(f"{path}." for path, _ in lists)
    head = head_name(model)
    for name, module in model.named_modules():
        if is_linear_like(module):
            in_f, out_f = features(module)
            inv.numel[name] = in_f * out_f
            if name == head:
                if include_lm_head:
                    inv.candidates.append((name, in_f, out_f))
                else:
                    inv.kept[name] = HEAD_NOT_TUNED
            elif not name.startswith(prefixes):
                inv.kept[name] = _outside_reason(name)
            elif is_router(model, name):
                inv.kept[name] = "router"
            else:
                inv.candidates.append((name, in_f, out_f))
    for name, module in model.named_modules():  # routers that are not Linear layers (a top-k router's own weight)
        weight = getattr(module, "weight", None)
        if name.startswith(prefixes) and name not in inv.numel and _is_2d(weight) and is_router(model, name):
            inv.numel[name] = weight.numel()
            inv.kept[name] = "router"
    fused = find_fused_experts(model)
    for name, module in model.named_modules():  # 3-D (expert) weights no Linear holds: reported, never silent
        stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if stacked:
            inv.numel[name] = sum(p.numel() for p in stacked)
            reason = unsupported_reason(module) if name in fused else None
            inv.kept[name] = (
                reason or f"{type(module).__name__}: 3-D expert weights in a layout signround cannot unfuse"
            )
    return inv


def _is_2d(weight: object) -> bool:
    return isinstance(weight, nn.Parameter) and weight.dim() == 2


def _outside_reason(name: str) -> str:
    if name.startswith(NONTEXT_PREFIXES):
        return "vision / audio tower (quant_nontext_module=False)"
    return "outside the quantized blocks"


def quantizable_layers(model: nn.Module, include_lm_head: bool = False) -> list[tuple[str, int, int]]:
    """Candidate layers ``(name, in_features, out_features)``: every Linear-like layer inside the decoder blocks
    (routers excepted) + lm_head when asked."""
    return inventory(model, include_lm_head).candidates
