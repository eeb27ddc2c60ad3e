"""Norm tuning (``enable_norm_bias_tuning``): the block's normalisation weights move with the rounding.

A block's RMSNorm / LayerNorm weights scale each input channel of the layers after them, so a small change of
them can take up part of the quantization error those layers make (what AWQ-style channel scaling does, but
trained on the block's output).  As in the reference, each weight moves by ``v * step`` with ``v`` in
``[-0.5, 0.5]`` trained by the same signed descent as the rounding offsets and ``step`` the weight's own grid
step at the scheme's bit width ((max - min) / (2^bits - 1) per group): half a quantization step at most, in 16 bit.
The norm stays unquantized; the tuned weight is written back as the model's own, so every export format keeps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .tunable import TunableParameters


def norm_modules(block: nn.Module, skip: set[str]) -> dict[str, nn.Module]:
    """The block's normalisation layers with a 1-D weight (relative names), outside the ``skip`` subtrees."""
    found = {}
    for name, module in block.named_modules():
        if not name or any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        weight = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(weight, nn.Parameter) and weight.dim() == 1:
            found[name] = module
    return found


class TunableNorm(TunableParameters):
    """A norm computing with ``w0 + v * step`` (``v`` trainable) instead of its stored weight."""

    def __init__(self, norm: nn.Module, bits: int, group_size: int):
        super().__init__()
        self.norm = norm
        w0 = norm.weight.detach().float().clone()
        groups = w0.view(-1, group_size) if group_size > 0 and w0.numel() % group_size == 0 else w0.view(1, -1)
        step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / (2**bits - 1)
        self.register_buffer("w0", w0, persistent=False)
        self.register_buffer("step", step.clamp_min(1e-5).expand_as(groups).reshape(-1).clone(), persistent=False)
        self.v = nn.Parameter(torch.zeros_like(w0))
        self._judged: torch.Tensor | None = None

    def weight_of(self, v: torch.Tensor) -> torch.Tensor:
        return self.w0 + v * self.step

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # (a gated norm takes a gate)
        v = self.v if self._judged is None else self._judged
        # the norm's other parameters (a LayerNorm's bias) in the loop's dtype too: the norm stays out of the
        # block's cast to it (its weight is computed here)
        params = {name: p.to(x.dtype) for name, p in self.norm.named_parameters(recurse=False)}
        params["weight"] = self.weight_of(v).to(x.dtype)
        return functional_call(self.norm, params, (x, *args), kwargs)

    @torch.no_grad()
    def write(self, v: torch.Tensor) -> None:
        """Set the wrapped norm's stored weight to the tuned one."""
        self.norm.weight.copy_(self.weight_of(v).to(self.norm.weight.dtype))
