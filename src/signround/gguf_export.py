"""GGUF output, end to end: plan each layer toward the type ``llama-quantize`` gives it, then write the file.

The block math is :mod:`signround.quant.gguf`, the type recipes :mod:`signround.quant.gguf_mixtures`, the
container :mod:`signround.packing.gguf` (gguf-py's writer); this module joins them to a model and its plan:

* before tuning, :func:`gguf_layer_config` turns a file type (``"q4_k_m"``) into per-layer GGUF types, so every
  layer is tuned toward the grid it will be stored in (a user's ``layer_config`` entry wins over the recipe);
* at save time, :func:`write_gguf_model` writes the tuned layers' blocks unchanged; the weights tuning does not
  touch (token embedding, an unquantized output head) get llama.cpp's own quantizer at the recipe's type, as
  ``llama-quantize`` would; layers kept in 16 bit are stored as f16, norms as f32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import head_is_tied, head_name
from .packing.gguf import planned_types, write_gguf
from .quant import gguf
from .quant.gguf_mixtures import mixture
from .schemes import LayerSpec, gguf_spec_fields, gguf_type_of, key_matches

logger = logging.getLogger(__name__)

FLOAT_TYPES = ("f32", "f16", "bf16")


def gguf_can_hold(spec: LayerSpec, in_features: int) -> str | None:
    """Why a GGUF type cannot store a layer with rows of ``in_features`` (``None`` if it can)."""
    t = gguf_type_of(spec.data_type)
    if t is None:
        return f"data_type={spec.data_type!r} is not a GGUF type"
    if in_features % t.block_size:
        return f"{t.name} stores rows in blocks of {t.block_size}; in_features={in_features} is not a multiple"
    return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor the file will hold, by HF name (shapes only: planning runs on meta / offloaded weights too)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def gguf_layer_config(
    model: nn.Module, config: Any, candidates: Iterable[tuple[str, int, int]], mixture_name: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``layer_config`` that gives every candidate layer its type in ``mixture_name`` (llama.cpp's recipe),
    with the user's own entries after it, and ``{layer: why}`` for layers the recipe keeps in 16 bit.

    Layers a user key names keep the user's value (a recipe entry for them would win as an exact name)."""
    tied = head_is_tied(model) and not config.quant_lm_head
    types = planned_types(model.config, _shapes(model), mixture_name, tied)
    user = dict(config.layer_config)
    out: dict[str, Any] = {}
    kept: dict[str, str] = {}
    for name, in_features, _out_features in candidates:
        if any(key_matches(key, name) for key in user):
            continue
        type_name = types.get(f"{name}.weight")
        if type_name is None:
            continue
        if type_name in FLOAT_TYPES:
            out[name] = 16
            kept[name] = f"llama.cpp's {mixture_name} stores it as {type_name} (rows of {in_features} fit no block)"
        else:
            out[name] = gguf_spec_fields(type_name)
    return {**out, **user}, kept


def gguf_file_name(model: nn.Module, mixture_name: str) -> str:
    """``<model>-<TYPE>.gguf``, as llama.cpp's tools name their outputs."""
    base = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    return f"{base}-{mixture_name.upper()}.gguf"


@torch.no_grad()
def write_gguf_model(
    target_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    quantized: Mapping[str, Any],
    kept: Iterable[str],
    mixture_name: str,
) -> Path:
    """Write ``model`` as one GGUF file of type ``mixture_name`` into ``target_dir``; returns its path.

    ``quantized``: layer name -> ``GGUFQuantized`` (tuning's result); ``kept``: planned layers left in 16 bit.
    Every other quantizable weight the recipe types (the embedding, an untuned head) is quantized here with
    llama.cpp's own quantizer, and logged."""
    if tokenizer is None:
        raise ValueError("a GGUF file carries its tokenizer: pass the model's tokenizer")
    m = mixture(mixture_name)
    state = model.state_dict()
    tensors: dict[str, Any] = dict(state)
    for layer, q in quantized.items():
        if not isinstance(q, gguf.GGUFQuantized):
            raise ValueError(f"{layer} was quantized as {getattr(q, 'spec', q)!r}, not as a GGUF type")
        tensors[f"{layer}.weight"] = q
    head = head_name(model)
    tied = head_is_tied(model) and head not in quantized
    if tied and head is not None:
        tensors.pop(f"{head}.weight", None)
    types = planned_types(model.config, {n: tuple(t.shape) for n, t in tensors.items()}, m.name, tied)
    untouched = {f"{name}.weight" for name in kept}
    for name, type_name in types.items():
        value = tensors[name]
        if isinstance(value, gguf.GGUFQuantized) or type_name in FLOAT_TYPES or name in untouched:
            continue
        logger.info("GGUF: %s stored as %s by llama.cpp's quantizer (not tuned)", name, type_name)
        tensors[name] = gguf.quantize(value.float(), type_name)
    path = target_dir / gguf_file_name(model, m.name)
    return write_gguf(path, model.config, tokenizer, tensors, float_type="f16", file_type=m.file_type)
