"""CPU backend for 2/3/4-bit layers on PyTorch's own packed-int4 matmul (``aten._weight_int4pack_mm_for_cpu``).

Decode on CPU is memory-bound: every token reads every weight once, so bytes per weight decide.  This kernel
reads the 4-bit codes directly (half a byte per weight) instead of dequantizing to a dense matrix.  At load
(``post_init``) each layer's codes are repacked into the kernel's layout
(``aten._convert_weight_to_int4pack_for_cpu``) and its scales / zero points into the kernel's
``[groups, out, 2]`` table, where the kernel dequantizes ``(q - 8) * scale + offset``; ours is
``(q - zero) * scale``, so ``offset = (8 - zero) * scale``.

One copy of the codes stays resident: the checkpoint-format tensors are dropped after the repack and rebuilt,
bit-exact, when the layer is saved (codes decoded from the kernel layout, scales and zero points kept in their
checkpoint precision, which the kernel's bf16 table cannot reproduce; symmetric layers keep no zero points). The
decoding relies on the kernel's layout, which torch does not document, so :func:`layout_mismatch` checks it once per
process and the backend steps aside (the torch reference takes the layer) if a torch release changes it.

Per call shape: the kernel is a GEMV-style loop, fast for a few rows (decode) and slow for long inputs; from
``DENSE_MIN_ROWS`` rows on (prefill), the layer dequantizes its weight into a dense matrix for that call (exact
values rounded once to bf16, or fp32 where the CPU lacks native bf16) and uses the ordinary matmul, whose cost the
many rows amortise.

The kernel is fast with bf16 activations and many times slower with float32 or float16 ones, so its inputs are
cast to bf16 and the result cast back; the tolerance against the torch reference is therefore that of bf16
activations (see ``tests/test_kernels_torch_int4.py``).  The dense path computes in bf16 where the CPU has native
bf16, else in float32.  Kernel limits: groups of 32 / 64 / 128 / 256 input features, ``out_features`` a multiple
of 16.  A larger group that is a multiple of 32 (per-channel layers, groups of 512, ...) runs as several kernel
groups sharing its scale and offset: the same arithmetic, for 4 bytes of table per kernel group.

2- and 3-bit layers run here too, their codes held as 4-bit ones, shifted to centre on the kernel's 8 so that
``(q - 8) * scale + offset`` cancels no more than at 4 bits: ``(q - zero) * scale`` is the same arithmetic for any
code below 16, at half a byte per weight instead of 1/4 or 3/8, and at this kernel's speed rather than that of the
dequantize-every-forward reference, their only other CPU path.
"""

from __future__ import annotations

from functools import cache

import torch

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LayerSpec
from .registry import Backend, register_backend
from .repacked import RepackedQuantLinear

__all__ = [
    "DENSE_MIN_ROWS",
    "KERNEL_GROUP_SIZES",
    "TORCH_INT4_BACKEND",
    "TorchInt4QuantLinear",
    "decode_int4pack",
    "kernel_available",
    "layout_mismatch",
]

KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what the kernel accepts; larger groups (per-channel too) are split
# Rows (tokens) from which dequantize + dense matmul beats the int4 kernel on CPU; measured with
# bench/speed.py --crossover on SmolLM2 shapes (see docs/backends.md).
DENSE_MIN_ROWS = 128
_BLOCK_N = 64  # the kernel's layout: blocks of 64 output rows, rows n and n + 32 share a byte


def kernel_available() -> str | None:
    """``None`` when this torch has the CPU int4 ops, else why not."""
    for op in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
        if not hasattr(torch.ops.aten, op):
            return f"torch {torch.__version__} lacks aten.{op} (needs torch >= 2.6)"
    return None


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def decode_int4pack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` from the kernel's packed weight (inverse of ``_convert_weight_to_int4pack_for_cpu``).

    Layout (torch 2.6 - 2.13): full blocks of 64 output rows, each ``[in, 32]`` bytes whose low nibble holds row
    ``n`` and high nibble row ``n + 32``; a remaining ``r < 64`` rows form one ``[in, r / 2]`` block whose bytes
    hold rows ``2j`` (low) and ``2j + 1`` (high).
    """
    flat = packed.reshape(-1)
    full = out_features // _BLOCK_N * _BLOCK_N
    parts = []
    if full:
        blocks = flat[: full * in_features // 2].reshape(full // _BLOCK_N, in_features, _BLOCK_N // 2)
        nibbles = torch.cat([blocks & 0xF, blocks >> 4], dim=2)  # [blocks, in, 64]
        parts.append(nibbles.permute(0, 2, 1).reshape(full, in_features))
    if rest := out_features - full:
        tail = flat[full * in_features // 2 :].reshape(in_features, rest // 2)
        parts.append(torch.stack([tail & 0xF, tail >> 4], dim=2).reshape(in_features, rest).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


@cache
def layout_mismatch() -> str | None:
    """``None`` if :func:`decode_int4pack` inverts this torch's packing (checked on a probe with a tail block)."""
    if reason := kernel_available():
        return reason
    # explicit device: the first call usually comes from inside from_pretrained's meta-device context
    cpu = torch.device("cpu")
    probe = torch.randint(0, 16, (80, 64), generator=torch.Generator(cpu).manual_seed(0), dtype=torch.int32, device=cpu)
    if not torch.equal(decode_int4pack(_pack(probe), 80, 64).to(torch.int32), probe):
        return f"torch {torch.__version__} packs int4 CPU weights in a layout this backend cannot decode"
    return None


def _group_reason(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
    group = effective_group_size(spec.group_size, in_features)
    if group % KERNEL_GROUP_SIZES[-1]:
        return f"group of {group} input features is not a multiple of 32 (the kernel takes groups of 32 to 256)"
    return None


class TorchInt4QuantLinear(RepackedQuantLinear):
    """2/3/4-bit layers through ``aten._weight_int4pack_mm_for_cpu``; repacked once at load."""

    backend_name = "torch_int4"
    dense_min_rows: int = DENSE_MIN_ROWS  # per-call path switch (bench/speed.py --crossover varies it)

    def repack(self, qt: QuantizedTensor) -> None:
        # compute_dtype is bf16: here (AMX) fp16 and fp32 inputs are 24-40x slower per call (bench/speed.py
        # --dtypes), and issue 5 reports the same for an AVX2 CPU without native bf16.
        # 2/3-bit codes are centred on the kernel's 8: (q - 8) * s + offset then cancels no more than at 4 bits
        # (codes near 0 with offset ~ 8 s would lose bf16 digits); the shift is undone when the codes are read back
        self.code_shift = 8 - 2 ** (qt.spec.bits - 1)
        # a group the kernel cannot take (per-channel, 512, ...) is split into equal kernel groups sharing its values
        self.kernel_group_size = next(g for g in KERNEL_GROUP_SIZES if self.group_size % g == 0)
        repeat = self.group_size // self.kernel_group_size
        scales = qt.scales.float().repeat_interleave(repeat, dim=1)
        offsets = (8 - self.code_shift - qt.zeros.float().repeat_interleave(repeat, dim=1)) * scales
        table = torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous()  # [kernel groups, out, 2]
        self.register_buffer("int4_weight", _pack(qt.codes.to(torch.int32) + self.code_shift), persistent=False)
        self.register_buffer("scales_offsets", table.to(self.compute_dtype), persistent=False)

    def kernel_codes(self) -> torch.Tensor:
        return decode_int4pack(self.int4_weight, self.out_features, self.in_features) - self.code_shift

    def kernel_forward(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu.default(
            flat, self.int4_weight, self.kernel_group_size, self.scales_offsets
        )


TORCH_INT4_BACKEND = register_backend(
    Backend(
        name="torch_int4",
        quant_linear=TorchInt4QuantLinear,
        devices=("cpu",),
        bits=(2, 3, 4),  # 2/3-bit codes fit the 4-bit kernel exactly
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        packings=None,  # any registered packer: post_init unpacks through it
        check=_group_reason,
        priority=10,  # above the dequantize-then-matmul reference
        out_features_multiple=16,
        environment=layout_mismatch,
    )
)
