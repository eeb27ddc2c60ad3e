"""CPU backend for symmetric 8-bit layers on PyTorch's own int8-weight matmul (``aten._weight_int8pack_mm``).

Without it an 8-bit layer on CPU has only the torch reference, which dequantizes the whole weight on every call
(2-4x the bytes of the codes, written and read again): SmolLM2 W8 decodes at a quarter of fp32's speed on it
(``bench/speed.py --bits 8``; 0.62x / 0.86x / 1.24x fp32 on this backend at G32 / G64 / per channel).  The
kernel reads the int8 codes directly, but it knows one scale per output row, so a layer with G groups per row is
G calls, one per group (the group's slice of the codes stored contiguously), their bf16 results summed in fp32.
A symmetric code ``q`` is held as ``q - 128`` (exactly an int8); a layer whose zero points are not all 128 adds
``sum_g (128 - zero_g) * scale_g * sum(x_g)``, kept in fp32.

Like torch_int4 (see kernels/repacked.py): one resident copy of the codes (the checkpoint tensors are rebuilt on
save), inputs cast to bf16 (the kernel's only vectorised dtype on x86: float32 and float16 take a scalar loop, 8x
and 20x slower per call, ``bench/speed.py --dtypes``), and from ``DENSE_MIN_ROWS`` rows on the dense path.

Kernel limits (its AVX-512 loop loads 16 values at a time, aligned): groups of a multiple of 16 input features,
activation rows 64-byte aligned (an unaligned input view is copied first).
"""

from __future__ import annotations

import torch

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LayerSpec
from .registry import Backend, register_backend
from .repacked import RepackedQuantLinear

__all__ = ["DENSE_MIN_ROWS", "TORCH_INT8_BACKEND", "TorchInt8QuantLinear"]

# Rows from which dequantize + dense matmul beats the per-group int8 calls (bench/speed.py --crossover).
DENSE_MIN_ROWS = 16
_ALIGN = 64  # bytes; the kernel's aligned 256-bit loads need 32


def kernel_available() -> str | None:
    """``None`` when this torch has the CPU int8-weight matmul, else why not."""
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return f"torch {torch.__version__} lacks aten._weight_int8pack_mm (needs torch >= 2.4)"
    return None


def _group_reason(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
    group = effective_group_size(spec.group_size, in_features)
    if group % 16:
        return f"group of {group} input features is not a multiple of 16 (the kernel's vector width)"
    return None


class TorchInt8QuantLinear(RepackedQuantLinear):
    """Symmetric 8-bit layers through ``aten._weight_int8pack_mm``, one call per group; repacked once at load."""

    backend_name = "torch_int8"
    dense_min_rows: int = DENSE_MIN_ROWS

    def repack(self, qt: QuantizedTensor) -> None:
        groups = self.in_features // self.group_size
        centred = (qt.codes.to(torch.int16) - 128).to(torch.int8)
        per_group = centred.reshape(self.out_features, groups, self.group_size).transpose(0, 1).contiguous()
        self.register_buffer("int8_weight", per_group, persistent=False)  # [groups, out, group]: contiguous slices
        self.register_buffer("group_scales", qt.scales.t().to(self.compute_dtype).contiguous(), persistent=False)
        zero_term = None
        if self._uniform_zero is None:  # zero points not all 128: not expected of a symmetric layer, but exact
            zero_term = ((128 - qt.zeros.float()) * qt.scales.float()).t().contiguous()  # [groups, out]
        self.register_buffer("zero_term", zero_term, persistent=False)

    def kernel_codes(self) -> torch.Tensor:
        codes = self.int8_weight.transpose(0, 1).reshape(self.out_features, self.in_features)
        return (codes.to(torch.int16) + 128).to(torch.uint8)

    def _per_group(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each group's codes and scales as views, made once per buffer (indexing costs ~1 µs a call, and a W8G32
        layer makes one call per group of 32 inputs)."""
        cached = self.__dict__.get("_group_views")
        if cached is None or cached[0] is not self.int8_weight or cached[1] is not self.group_scales:
            cached = (self.int8_weight, self.group_scales, self.int8_weight.unbind(0), self.group_scales.unbind(0))
            self.__dict__["_group_views"] = cached
        return cached[2], cached[3]

    def kernel_forward(self, flat: torch.Tensor) -> torch.Tensor:
        weights, scales = self._per_group()
        by_group = flat.view(-1, len(weights), self.group_size).transpose(0, 1).contiguous()  # [groups, rows, group]
        if by_group.data_ptr() % _ALIGN:
            by_group = by_group.clone()
        mm = torch.ops.aten._weight_int8pack_mm.default
        if len(weights) == 1:
            y = mm(by_group[0], weights[0], scales[0])
        else:
            parts = [mm(x, w, s) for x, w, s in zip(by_group.unbind(0), weights, scales, strict=True)]
            y = torch.stack(parts).sum(0, dtype=torch.float32)
        if self.zero_term is not None:
            y = y.float() + by_group.float().sum(-1).t() @ self.zero_term
        return y


TORCH_INT8_BACKEND = register_backend(
    Backend(
        name="torch_int8",
        quant_linear=TorchInt8QuantLinear,
        devices=("cpu",),
        bits=(8,),
        sym=(True,),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        packings=None,  # any registered packer: post_init unpacks through it
        priority=10,  # above the dequantize-then-matmul reference
        check=_group_reason,
        environment=kernel_available,
    )
)
