"""Intel Extension for PyTorch's weight-only int4 linear (CPU and Intel GPU), the reference tool's CPU/XPU choice.

IPEX builds are tied to one torch release (2.8 for the last CPU build), so with the torch this project pins it is
normally absent or fails to import; the descriptor says which, and the selector takes ``native`` / ``torch_int4`` /
``torch``.  When it does import, ``post_init`` hands the layer to
``ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear.from_weight`` in AWQ GEMM layout: AWQ stores zero points
as-is, so every symmetric or asymmetric 4-bit layer fits (GPTQ v1's ``zero - 1`` cannot hold a zero point of 0).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import replace
from functools import cache

import torch

from ..packing import get_packer
from ..quant.int import QuantizedTensor, effective_group_size
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = ["IPEX_BACKEND", "IpexQuantLinear", "ipex_import_error"]

IPEX_MODULE = "intel_extension_for_pytorch"
_AWQ_GEMM = 1  # ipex.llm.quantization.QuantMethod.AWQ_GEMM
_INT4 = 0  # ipex.llm.quantization.QuantDtype.INT4


@cache
def ipex_import_error() -> str | None:
    """``None`` if IPEX imports (or is not installed: the descriptor's ``requires`` says so), else why it fails."""
    if importlib.util.find_spec(IPEX_MODULE) is None:
        return None
    try:
        importlib.import_module(IPEX_MODULE)
    except Exception as err:  # IPEX raises plain exceptions on a torch mismatch
        return (
            f"intel-extension-for-pytorch is installed but does not import with torch {torch.__version__} "
            f"(each IPEX build matches one torch release): {type(err).__name__}: {err}"
        )
    return None


def awq_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """``qweight`` / ``qzeros`` / ``scales`` in AWQ GEMM layout for any 4-bit layer (sym layers are written with
    their explicit zero point, which AWQ stores as-is)."""
    as_asym = QuantizedTensor(qt.codes, qt.scales, qt.zeros, replace(qt.spec, sym=False))
    return get_packer("awq_gemm").pack(as_asym)


class IpexQuantLinear(QuantLinear):
    """4-bit layers through IPEX's weight-only-quantized linear; built once at ``post_init``."""

    backend_name = "ipex"

    def post_init(self) -> None:
        ipex = importlib.import_module(IPEX_MODULE)
        qt = self.quantized_tensor()
        tensors = awq_tensors(qt)
        group_size = effective_group_size(qt.spec.group_size, self.in_features)
        # not an attribute nn.Module tracks: the saved state stays exactly the checkpoint buffers
        object.__setattr__(
            self,
            "_ipex_linear",
            ipex.llm.quantization.IPEXWeightOnlyQuantizedLinear.from_weight(
                tensors["qweight"],
                tensors["scales"].to(self.dtype),
                tensors["qzeros"],
                self.in_features,
                self.out_features,
                None,  # qconfig: IPEX's default weight-only config
                None if self.bias is None else self.bias.to(self.dtype),
                group_size,
                None,  # g_idx: the packer already applied any act-order permutation
                _AWQ_GEMM,
                _INT4,
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._ipex_linear(x.reshape(-1, self.in_features).to(self.dtype))
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


IPEX_BACKEND = register_backend(
    Backend(
        name="ipex",
        quant_linear=IpexQuantLinear,
        devices=("cpu", "xpu"),
        bits=(4,),
        dtypes=(torch.bfloat16, torch.float16),
        packings=None,  # any registered packer: post_init unpacks through it and repacks as AWQ
        priority=5,  # the reference's rank; below native / torch_int4 on CPU, which run with the pinned torch
        requires=("intel-extension-for-pytorch>=2.4",),  # IPEXWeightOnlyQuantizedLinear.from_weight
        out_features_multiple=8,  # AWQ packs eight output columns per word
        environment=lambda: ipex_import_error(),  # looked up at call time, so tests can replace it
    )
)
