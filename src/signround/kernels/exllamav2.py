"""``exllamav2`` backend: GPTQModel 7.6's ExLlamaV2 GEMM (CUDA, 4-bit, symmetric or asymmetric) on our layers.

At load (``post_init``) the layer's codes are unpacked from its checkpoint buffers (any of our packings), written
as GPTQ tensors with zero points as-is (the "v2" format this kernel reads) into a GPTQModel ``ExllamaV2Linear``,
whose ``post_init`` builds the kernel's matrix handle; ``forward`` runs that layer (see
:mod:`signround.kernels.gptqmodel_bridge`).  It backs up ``marlin`` for what Marlin cannot run: asymmetric layers
and shapes off Marlin's tile.

Limits, mirroring GPTQModel 7.6 (``gptqmodel/nn_modules/qlinear/exllamav2.py`` and its CUDA sources in
``gptqmodel_ext/exllamav2``):

* 4-bit; group sizes -1, 32, 64, 128 (16 is disabled upstream for accuracy); ``in`` and ``out`` multiples of 32;
  Linux or Windows, NVIDIA (no ROCm).
* The kernel computes in fp16 only: bf16 activations are cast to fp16 and the result back (as GPTQModel does), so
  bf16 activations beyond fp16's range (65504) overflow.  Scales are fp16, as our checkpoints store them.
* GPTQModel hands the kernel the ``g_idx`` and the kernel keeps a 16-bit row permutation, so ``in_features`` must
  stay below 65536.
* The kernels launch on CUDA's legacy default stream, not on torch's current stream.  So a layer runs only on the
  default stream: on another stream it would race with the work around it, and inside a CUDA graph capture (which
  runs on a side stream) nothing of it is recorded, the replay leaving the output stale (on an H100, 2026-11-26,
  ``bench/gpu_decode.py``'s graph replay chose no token of the eager decode's).  ``forward`` raises there, naming
  the backends that can (marlin, triton).
* Above 50 rows the kernel dequantizes the whole weight into a scratch buffer and calls cuBLAS.  That buffer is
  shared by the layers of one device (as GPTQModel's ``gptqmodel_post_init`` shares one), grown when a larger
  layer comes, and freed with the last layer that uses it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..quant.int import QuantizedTensor
from ..schemes import LayerSpec
from .gptqmodel_bridge import (
    GPTQMODEL_REQUIREMENT,
    GptqModelQuantLinear,
    build_gptq_layer,
    cuda_toolkit_reason,
    import_gptqmodel,
    platform_reason,
)
from .registry import Backend, register_backend

__all__ = ["EXLLAMAV2_BACKEND", "ExllamaV2QuantLinear"]

MAX_IN_FEATURES = 65535  # the kernel's row permutation is uint16

# device -> GPTQModel ScratchSpace; weak, so the buffer goes with the last layer holding it
_SCRATCH: weakref.WeakValueDictionary[torch.device, Any] = weakref.WeakValueDictionary()


def _scratch_space(device: torch.device, nbytes: int) -> Any:
    """A GPTQModel ScratchSpace on ``device`` of at least ``nbytes``, shared with the device's other layers."""
    space = _SCRATCH.get(device)
    if space is None or space.scratch_bytes < nbytes:
        utils = import_gptqmodel("gptqmodel.utils.exllamav2")
        space = utils.ScratchSpace(scratch_bytes=nbytes, dev=device)
        _SCRATCH[device] = space  # earlier, smaller ones live on in the layers that point into them
    return space


def stream_reason(device: torch.device) -> str | None:
    """Why an ExLlamaV2 layer must not run now on ``device``: torch's current stream is not the default one."""
    if torch.cuda.current_stream(device) == torch.cuda.default_stream(device):
        return None
    capturing = " (a CUDA graph is being captured)" if torch.cuda.is_current_stream_capturing() else ""
    return (
        f"backend 'exllamav2' runs only on the default CUDA stream, and torch's current stream is another{capturing}: "
        "GPTQModel's ExLlamaV2 kernels launch on the default stream, so their work would race with this stream's "
        "or be left out of the graph; load the model with backend='marlin' or 'triton' to run on other streams "
        "or in CUDA graphs"
    )


class ExllamaV2QuantLinear(GptqModelQuantLinear):
    """4-bit layers through GPTQModel's ``ExllamaV2Linear``; its matrix handle is built once at load."""

    backend_name = "exllamav2"

    def _build_kernel(self, qt: QuantizedTensor) -> nn.Module:
        exllamav2 = import_gptqmodel("gptqmodel.nn_modules.qlinear.exllamav2")
        self.compute_dtype = torch.float16  # the kernel's only activation dtype
        layer = build_gptq_layer(exllamav2.ExllamaV2Linear, qt, torch.float16)
        scratch = _scratch_space(qt.codes.device, layer.temp_dq_size())
        layer.post_init(scratch_space=scratch)
        self.__dict__["_scratch"] = scratch  # the kernel's handle points into it
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if reason := stream_reason(x.device):
            raise RuntimeError(reason)
        return super().forward(x)


def _check(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
    if in_features > MAX_IN_FEATURES:
        return f"in_features={in_features} > {MAX_IN_FEATURES}: ExLlamaV2 permutes input rows with 16-bit indices"
    return None


def _environment() -> str | None:
    return platform_reason("ExLlamaV2", ("linux", "win32")) or cuda_toolkit_reason()


EXLLAMAV2_BACKEND = register_backend(
    Backend(
        name="exllamav2",
        quant_linear=ExllamaV2QuantLinear,
        devices=("cuda",),
        bits=(4,),
        dtypes=(torch.float16, torch.bfloat16),
        packings=None,  # any registered packer: post_init unpacks through it
        group_sizes=(-1, 32, 64, 128),
        sym=(True, False),
        priority=5,
        requires=(GPTQMODEL_REQUIREMENT,),
        in_features_multiple=32,
        out_features_multiple=32,
        check=_check,
        environment=_environment,
    )
)
