"""Intel Gaudi (HPU) backend: the Habana stack's ``torch.ops.hpu.convert_from_uint4`` dequantizes, then a matmul.

The op takes 4-bit codes and zero points packed eight per int32 along the *output* dimension (``[in, out / 8]`` and
``[groups, out / 8]``, zero points as-is) and ``scales [groups, out]``, and returns the ``[in, out]`` weight in the
activation dtype.  ``post_init`` repacks any checkpoint layout into that one.  The stack exists only on Gaudi
machines, so here the backend is exercised through selection and through a stand-in for the op (tests).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from ..packing.bits import pack_int32
from ..quant.int import QuantizedTensor
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = ["HPU_BACKEND", "HpuQuantLinear", "hpu_tensors"]

HABANA_MODULE = "habana_frameworks"


def habana_missing() -> str | None:
    """``None`` when the Habana PyTorch bridge is importable (it is installed with the Gaudi driver stack, not pip)."""
    if importlib.util.find_spec(HABANA_MODULE) is None:
        return "needs the Habana PyTorch stack (habana_frameworks, installed with the Gaudi software; not on pip)"
    return None


def hpu_tensors(qt: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The three tensors ``convert_from_uint4`` reads: codes and zeros packed along the output dimension."""
    return {
        "qweight": pack_int32(qt.codes.t().to(torch.int32), 4, dim=1),  # [in, out / 8]
        "qzeros": pack_int32(qt.zeros.t().to(torch.int32), 4, dim=1),  # [groups, out / 8]
        "scales": qt.scales.t().to(dtype).contiguous(),  # [groups, out]
    }


def _convert_from_uint4() -> Callable[..., torch.Tensor]:
    import habana_frameworks.torch.core  # noqa: F401  (registers torch.ops.hpu)

    return torch.ops.hpu.convert_from_uint4


class HpuQuantLinear(QuantLinear):
    """4-bit layers on Gaudi: dequantize with the Habana op every forward, then ``matmul``."""

    backend_name = "hpu"
    convert_op: Callable[..., torch.Tensor] | None = None  # the Habana op unless set (tests set a stand-in)

    def post_init(self) -> None:
        self._convert_from_uint4 = self.convert_op or _convert_from_uint4()
        for name, tensor in hpu_tensors(self.quantized_tensor(), self.dtype).items():
            self.register_buffer(f"hpu_{name}", tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._convert_from_uint4(self.hpu_qweight, self.hpu_scales.to(x.dtype), self.hpu_qzeros, x.dtype)
        y = torch.matmul(x, weight)
        return y if self.bias is None else y + self.bias.to(x.dtype)


HPU_BACKEND = register_backend(
    Backend(
        name="hpu",
        quant_linear=HpuQuantLinear,
        devices=("hpu",),
        bits=(4,),
        dtypes=(torch.bfloat16, torch.float16, torch.float32),
        packings=None,  # any registered packer: post_init unpacks through it
        priority=5,  # the only quantized kernel on HPU besides the torch reference
        out_features_multiple=32,  # codes packed 8 per word along out, whole 32-column runs
        environment=habana_missing,
    )
)
