"""Pure-PyTorch backend for the floating-point schemes (MXFP4 / MXFP8, NVFP4, FP8): dequantize, then ``F.linear``.

The reference for every faster fp kernel, and what loading runs on a CPU.  The weight is
:func:`signround.quant.fp.dequantize` of the stored codes and scales (float32 arithmetic, rounded once to the
activation dtype); where the scheme quantizes activations, the input goes through the same
:func:`~signround.quant.fp_tensor.quantize_input` tuning used (dynamic MX / FP8 blocks, or the checkpoint's calibrated
``input_scale`` / ``input_global_scale``), so the loaded layer computes what the tuned one did.  Nothing is cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.fp_tensor import dequantize, quantize_input
from ..schemes import FP_DATA_TYPES
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = ["TORCH_FP_BACKEND", "TorchFPQuantLinear"]


class TorchFPQuantLinear(QuantLinear):
    """Dequantize-then-matmul for floating-point layers; activations fake-quantized as the scheme says."""

    backend_name = "torch_fp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.quantized_tensor()
        x = quantize_input(x, self.spec, t.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(t, x.dtype), bias)


TORCH_FP_BACKEND = register_backend(
    Backend(
        name="torch_fp",
        quant_linear=TorchFPQuantLinear,
        devices=("cpu", "cuda", "xpu"),
        bits=(4, 8),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        packings=None,  # any packer of floating-point layers: the layer unpacks through it
        data_types=FP_DATA_TYPES,
        sym=(True,),
        priority=1,  # the only fp kernel, never competing with the int ones; ranked above the int reference (0)
    )
)
