"""Shared life cycle of CPU backends that repack a layer's codes into their kernel's layout (native,
torch_int4, torch_int8).

On CPU the kernel's copy is the only one worth keeping: a second, checkpoint-format copy of the codes would cost
as much memory again.  So ``post_init`` keeps only what the kernel reads plus the few exact values its layout
cannot reproduce (torch's kernels: the checkpoint's scales, and the zero points unless they are all at the
midpoint, as in every symmetric layer; native's tables hold them exactly, so nothing more), drops the
checkpoint-format buffers, and ``state_dict()`` rebuilds them bit-exactly from the kernel's tensors.  Long inputs (prefill) take a dense path: the weight dequantized once for the call from the exact
values and an ordinary matmul, which the many rows amortise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.int import QuantizedTensor, effective_group_size
from ..tuning.block import fast_bf16
from .base import QuantLinear

__all__ = ["RepackedQuantLinear"]


class RepackedQuantLinear(QuantLinear):
    """Base class: subclasses build their kernel tensors in :meth:`repack` and read codes back in
    :meth:`kernel_codes`; this class keeps the exact values, drops the checkpoint copy and rebuilds it on save."""

    dense_min_rows: int = 128  # rows from which the dense path is taken; subclasses set their measured crossover
    # torch's CPU weight-only kernels are vectorised for bf16 activations only: fp16 / fp32 inputs are cast
    # (None: the kernel takes the input's dtype as it is)
    compute_dtype: torch.dtype | None = torch.bfloat16
    # False where the kernel's own tables hold the checkpoint's exact scales and zero points (no second copy);
    # such a subclass overrides :meth:`kernel_scales_zeros`
    keeps_exact_values: bool = True
    repacked: bool = False  # set by post_init

    def post_init(self) -> None:
        qt = self.quantized_tensor()
        self.group_size = effective_group_size(qt.spec.group_size, self.in_features)
        # the dense path's matmul is fast in bf16 only where the CPU has native bf16, else in fp32
        self.dense_dtype = torch.bfloat16 if fast_bf16(torch.device("cpu")) else torch.float32
        midpoint = 2 ** (qt.spec.bits - 1)  # symmetric layers need no copy of their zero points
        self._uniform_zero = midpoint if bool((qt.zeros == midpoint).all()) else None
        self.repack(qt)
        if self.keeps_exact_values:
            # row-major copies: packers may return transposed views, and the dense path's arithmetic with [out, in]
            # codes ran about 2x slower with its scales laid out the other way (bench/speed.py --crossover, see
            # docs/benchmarks.md)
            scales = qt.scales.clone(memory_format=torch.contiguous_format)
            self.register_buffer("saved_scales", scales, persistent=False)
            zeros = None if self._uniform_zero is not None else qt.zeros.to(torch.uint8).contiguous()
            self.register_buffer("saved_zeros", zeros, persistent=False)
        self.repacked = True
        for name in self.packer.tensor_shapes_dtypes(self.spec, self.in_features, self.out_features):
            setattr(self, name, None)  # drop the checkpoint-format copy: one copy of the codes stays resident

    def repack(self, qt: QuantizedTensor) -> None:
        """Register the kernel's non-persistent buffers built from ``qt`` (``self._uniform_zero`` is set: the zero
        point shared by every group, or None)."""
        raise NotImplementedError

    def kernel_codes(self) -> torch.Tensor:
        """The ``[out, in]`` codes read back from the kernel's buffers (inverse of :meth:`repack`)."""
        raise NotImplementedError

    def kernel_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exact ``[out, groups]`` scales and uint8 zero points (``None``: all at ``self._uniform_zero``)."""
        return self.saved_scales, self.saved_zeros

    def kernel_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``[rows, in]`` in ``compute_dtype`` -> ``[rows, out]`` through the kernel (no bias)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode calls this ~200 times per token with one row: no work beyond the kernel when dtypes already match
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= self.dense_min_rows:
            return self.finish(self.dense_forward(flat), x)
        if self.compute_dtype is not None and flat.dtype != self.compute_dtype:
            flat = flat.to(self.compute_dtype)
        return self.finish(self.kernel_forward(flat), x)

    def quantized_tensor(self) -> QuantizedTensor:
        if not self.repacked:
            return super().quantized_tensor()
        scales, zeros = self.kernel_scales_zeros()
        if zeros is None:
            zeros = torch.full(scales.shape, self._uniform_zero, dtype=torch.int32, device=scales.device)
        else:
            zeros = zeros.to(torch.int32)
        return QuantizedTensor(self.kernel_codes(), scales, zeros, self.spec)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """Write the checkpoint-format tensors, rebuilt from the repacked ones after ``post_init``."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.repacked:
            for name, tensor in self.packer.pack(self.quantized_tensor()).items():
                destination[prefix + name] = tensor

    def dense_weight(self) -> torch.Tensor:
        """The ``[out, in]`` weight in the dense path's dtype: ``(q - zero) * scale`` from the exact checkpoint
        values, computed in float32 and rounded once."""
        qt = self.quantized_tensor()
        groups = self.in_features // self.group_size
        q = qt.codes.reshape(self.out_features, groups, self.group_size).float()
        weight = (q - qt.zeros.unsqueeze(-1).float()).mul_(qt.scales.unsqueeze(-1).float())
        return weight.view(self.out_features, self.in_features).to(self.dense_dtype)

    def dense_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``[rows, in] -> [rows, out]`` through the dense weight (no bias)."""
        return F.linear(flat.to(self.dense_dtype), self.dense_weight())

    def finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[rows, out]`` kernel output -> the layer's output: bias, ``x``'s dtype and leading dimensions."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)
