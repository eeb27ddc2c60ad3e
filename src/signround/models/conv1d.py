"""GPT-2-style ``Conv1D`` layers: a Linear with its weight stored transposed (``[in, out]``).

Planning lists them with the Linear layers; before tuning, each planned one becomes the equivalent
``nn.Linear`` (weight transposed once), so tuning, packing and kernels see one kind of layer.  Layers kept
in 16 bit stay ``Conv1D`` so their checkpoint tensors keep the family's layout.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def to_linear(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace the named Conv1D layers by equivalent nn.Linear layers (same device, dtype, values)."""
    converted = []
    for name in names:
        module = model.get_submodule(name)
        if not is_conv1d(module):
            continue
        in_f, out_f = features(module)
        weight = module.weight.detach()
        linear = nn.Linear(in_f, out_f, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        model.set_submodule(name, linear)
        converted.append(name)
    return converted
