"""Module surgery: swapping ``nn.Linear`` layers for the QuantLinear of the backend chosen per layer.

Two moments need it: after tuning (fill the new layers from the quantized tensors) and before a packed
checkpoint is loaded (empty layers on the meta device, with buffers named as the checkpoint's tensors).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .kernels.base import QuantLinear
from .kernels.registry import select
from .models.conv1d import features, is_linear_like
from .quant.dispatch import Quantized, moved
from .schemes import LayerSpec


def _requested(backend: str | None) -> str | None:
    return None if backend in (None, "auto") else backend


def _select_for(name: str, spec: LayerSpec, packing: str, device, dtype: torch.dtype, linear, backend: str | None):
    """``select`` for one named layer; its errors name the layer, so a forced backend says which layer it cannot run."""
    in_features, out_features = (
        (linear.in_features, linear.out_features) if hasattr(linear, "in_features") else features(linear)
    )
    try:
        return select(spec, packing, device, dtype, in_features, out_features, _requested(backend))
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from err


def install_quantized(
    model: nn.Module,
    quantized: Mapping[str, Quantized],
    packing: str,
    backend: str | None = "auto",
    dtype: torch.dtype | None = None,
) -> dict[str, QuantLinear]:
    """Replace each named Linear (or the QuantLinear of another packing) by a ready QuantLinear holding its
    packed tensors."""
    installed = {}
    for name, qt in quantized.items():
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            act_dtype, device = dtype or linear.weight.dtype, linear.weight.device
        elif isinstance(linear, QuantLinear):  # re-packing into another format
            act_dtype, device = dtype or linear.dtype, next(iter(linear.buffers())).device
        else:
            raise TypeError(f"layer {name!r} is a {type(linear).__name__}, expected nn.Linear")
        chosen = _select_for(name, qt.spec, packing, device, act_dtype, linear, backend)
        bias = None if linear.bias is None else linear.bias.detach()
        qt_dev = moved(qt, device)
        layer = chosen.quant_linear.from_quantized(qt_dev, packing, bias, act_dtype)
        model.set_submodule(name, layer)
        installed[name] = layer
    return installed


def install_empty(
    model: nn.Module,
    specs: Mapping[str, LayerSpec],
    packing: str,
    device: str | torch.device,
    dtype: torch.dtype,
    backend: str | None = "auto",
) -> dict[str, QuantLinear]:
    """Replace each named Linear (or GPT-2 Conv1D) by an empty QuantLinear on the meta device, ready for the
    checkpoint loader.

    ``device`` is where the layer will run (it decides the backend); buffers are created on meta.
    """
    installed = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if not is_linear_like(linear):
            raise TypeError(f"checkpoint layer {name!r} is a {type(linear).__name__} in this model, expected nn.Linear")
        in_features, out_features = features(linear)
        chosen = _select_for(name, spec, packing, device, dtype, linear, backend)
        layer = chosen.quant_linear(
            in_features, out_features, spec, packing, linear.bias is not None, dtype, device="meta"
        )
        model.set_submodule(name, layer)
        installed[name] = layer
    return installed


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
