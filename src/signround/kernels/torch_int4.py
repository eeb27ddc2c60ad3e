"""CPU 4-bit backend on PyTorch's own packed-int4 matmul (``aten._weight_int4pack_mm_for_cpu``).

Decode on CPU is memory-bound: every token reads every weight once, so bytes per weight decide.  This kernel
reads the 4-bit codes directly (half a byte per weight) instead of dequantizing to a dense matrix.  At load
(``post_init``) each layer's codes are repacked into the kernel's layout
(``aten._convert_weight_to_int4pack_for_cpu``) and its scales / zero points into the kernel's
``[groups, out, 2]`` table, where the kernel dequantizes ``(q - 8) * scale + offset``; ours is
``(q - zero) * scale``, so ``offset = (8 - zero) * scale``.

The kernel is fast with bf16 (or fp16) activations and slow with float32 ones, so float32 inputs are computed in
bf16 where the CPU has native bf16 and the result cast back; the tolerance against the torch reference is
therefore that of bf16 activations (see ``tests/test_kernels_torch_int4.py``).  Kernel limits: 4-bit, groups of
32 / 64 / 128 / 256 input features, ``out_features`` a multiple of 16.
"""

from __future__ import annotations

import torch

from ..tuning.block import fast_bf16
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = ["TORCH_INT4_BACKEND", "TorchInt4QuantLinear", "kernel_available"]

GROUP_SIZES = (32, 64, 128, 256)


def kernel_available() -> str | None:
    """``None`` when this torch has the CPU int4 ops, else why not."""
    for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
        if not hasattr(torch.ops.aten, op):
            return f"torch {torch.__version__} lacks aten.{op} (needs torch >= 2.6)"
    return None


class TorchInt4QuantLinear(QuantLinear):
    """4-bit layers through ``aten._weight_int4pack_mm_for_cpu``; repacked once at load."""

    backend_name = "torch_int4"

    def post_init(self) -> None:
        qt = self.quantized_tensor()
        self.group_size = self.in_features if qt.spec.group_size == -1 else qt.spec.group_size
        cpu_bf16 = fast_bf16(torch.device("cpu"))
        self.compute_dtype = torch.bfloat16 if self.dtype == torch.float32 and cpu_bf16 else self.dtype
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.codes.to(torch.int32).contiguous(), 2)
        scales = qt.scales.float()
        offsets = (8 - qt.zeros.float()) * scales
        table = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        self.register_buffer("int4_weight", packed, persistent=False)
        self.register_buffer("scales_offsets", table.to(self.compute_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(self.compute_dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_weight, self.group_size, self.scales_offsets)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _check(spec, in_features: int, out_features: int) -> str | None:
    return kernel_available()


TORCH_INT4_BACKEND = register_backend(
    Backend(
        name="torch_int4",
        quant_linear=TorchInt4QuantLinear,
        devices=("cpu",),
        bits=(4,),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        packings=None,  # any registered packer: post_init unpacks through it
        group_sizes=GROUP_SIZES,
        priority=10,  # above the dequantize-then-matmul reference
        out_features_multiple=16,
        check=_check,
    )
)
