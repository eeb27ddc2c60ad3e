"""Pure-PyTorch backend: unpack, dequantize every group at once, then ``F.linear``.

It runs anywhere PyTorch does and with any registered packing (it goes through the packer's ``unpack``), so it is
both the fallback and the oracle every faster backend is tested against.  The arithmetic is
:func:`signround.quant.int.dequantize` itself, so the weight equals ``dequantize(qt, x.dtype)`` exactly and the
output equals ``F.linear(x, dequantize(qt, x.dtype), bias)`` up to the matmul's summation order (GPTQ-family and
AWQ packers unpack to transposed views, so the weight is built ``[in, out]``-major without a transposing copy).
Nothing is cached: the dense weight would cost as much memory as the unquantized layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.int import dequantize
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = ["TORCH_BACKEND", "TorchQuantLinear"]


class TorchQuantLinear(QuantLinear):
    """Dequantize-then-matmul in the activation dtype; bits 2/3/4/8, CPU, CUDA and Intel GPU."""

    backend_name = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self.quantized_tensor(), x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


TORCH_BACKEND = register_backend(
    Backend(
        name="torch",
        quant_linear=TorchQuantLinear,
        devices=("cpu", "cuda", "xpu"),
        bits=(2, 3, 4, 8),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        packings=None,  # any registered packer: the layer unpacks through it
        priority=0,
    )
)
