"""``marlin`` backend: GPTQModel 7.6's Marlin GEMM (CUDA, symmetric 4- and 8-bit) on our layers.

At load (``post_init``) the layer's codes are unpacked from its checkpoint buffers (any of our packings), written
as GPTQ tensors into a GPTQModel ``MarlinLinear`` and repacked by its own ``post_init``
(``gptq_marlin_repack``); ``forward`` runs that layer (see :mod:`signround.kernels.gptqmodel_bridge`).

Limits, mirroring GPTQModel 7.6 (``gptqmodel/nn_modules/qlinear/marlin.py`` and ``gptqmodel/utils/marlin.py``) so
that ``select()`` never picks a layer whose ``post_init`` would fail:

* bits 4 or 8, symmetric only: Marlin's weight types are ``uint4b8`` / ``uint8b128`` (code minus a fixed
  ``2^(bits-1)``), and ``post_init`` discards ``qzeros``.  Our symmetric zero point is exactly ``2^(bits-1)``; a
  layer whose stored zero points differ is refused at load rather than silently mis-computed.
* group sizes -1, 32, 64, 128; fp16 or bf16 activations; Linux, NVIDIA (no ROCm), compute capability >= 7.5.
* shapes on Marlin's thread tile (``out % 64 == 0 and in % 128 == 0``, or ``out % 128 == 0 and in % 64 == 0``).
  GPTQModel can zero-pad other shapes, paying a pad and slice on every forward; its own automatic selection
  skips them, and so do we (they go to ``exllamav2`` or the reference).
* On compute capability 7.5, Marlin has no bf16 path; bf16 layers there compute in fp16 (activations cast),
  as ExLlamaV2 always does.

Platform, ROCm, compute capability and the CUDA toolkit that GPTQModel's build needs are layer-independent, so
the descriptor checks them in ``environment``; the tile rule is its per-layer ``check``.  Scales are held in the
compute dtype (GPTQModel allocates them so): with bf16 activations the fp16 checkpoint scales are rounded to bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.int import QuantizedTensor
from ..schemes import LayerSpec
from .gptqmodel_bridge import (
    GPTQMODEL_REQUIREMENT,
    GptqModelQuantLinear,
    build_gptq_layer,
    cuda_capabilities,
    cuda_toolkit_reason,
    import_gptqmodel,
    platform_reason,
)
from .registry import Backend, register_backend

__all__ = ["MARLIN_BACKEND", "MarlinQuantLinear", "tile_aligned"]

MIN_CAPABILITY = (7, 5)
_FP16_ONLY_CAPABILITY = (7, 5)


def tile_aligned(in_features: int, out_features: int) -> bool:
    """Marlin's 64 x 128 thread tile, in either orientation (GPTQModel's ``marlin_is_tile_aligned``)."""
    return (out_features % 64 == 0 and in_features % 128 == 0) or (out_features % 128 == 0 and in_features % 64 == 0)


class MarlinQuantLinear(GptqModelQuantLinear):
    """Symmetric 4/8-bit layers through GPTQModel's ``MarlinLinear``; repacked once at load."""

    backend_name = "marlin"

    def _build_kernel(self, qt: QuantizedTensor) -> nn.Module:
        marlin = import_gptqmodel("gptqmodel.nn_modules.qlinear.marlin")
        midpoint = 2 ** (qt.spec.bits - 1)
        if not bool((qt.zeros == midpoint).all()):
            raise ValueError(
                f"marlin computes symmetric layers with the zero point fixed at {midpoint}, but this layer stores "
                f"zero points in [{int(qt.zeros.min())}, {int(qt.zeros.max())}]; use backend='exllamav2' or 'torch'"
            )
        compute = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16
        if compute == torch.bfloat16 and torch.cuda.get_device_capability(qt.codes.device) == _FP16_ONLY_CAPABILITY:
            compute = torch.float16
        self.compute_dtype = compute
        layer = build_gptq_layer(marlin.MarlinLinear, qt, compute)
        layer.post_init()
        return layer


def _check(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
    if not tile_aligned(in_features, out_features):
        return (
            f"in_features={in_features}, out_features={out_features} are not on Marlin's 64x128 tile "
            "(out % 64 and in % 128 == 0, or out % 128 and in % 64 == 0)"
        )
    return None


def _environment() -> str | None:
    if reason := platform_reason("Marlin", ("linux",)) or cuda_toolkit_reason():
        return reason
    old = [cap for cap in cuda_capabilities() if cap < MIN_CAPABILITY]
    if old:  # GPTQModel checks every visible device too; ours cannot tell here which one a layer will use
        return f"Marlin needs CUDA compute capability >= 7.5; a visible GPU has {old[0][0]}.{old[0][1]}"
    return None


MARLIN_BACKEND = register_backend(
    Backend(
        name="marlin",
        quant_linear=MarlinQuantLinear,
        devices=("cuda",),
        bits=(4, 8),
        dtypes=(torch.float16, torch.bfloat16),
        packings=None,  # any registered packer: post_init unpacks through it
        group_sizes=(-1, 32, 64, 128),
        sym=(True,),
        priority=6,
        requires=(GPTQMODEL_REQUIREMENT,),
        in_features_multiple=64,  # necessary for either tile orientation; check= asks for the whole tile
        out_features_multiple=64,
        check=_check,
        environment=_environment,
    )
)
