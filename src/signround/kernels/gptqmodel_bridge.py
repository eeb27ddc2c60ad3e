"""Shared plumbing for the backends that run GPTQModel's CUDA kernels (``marlin``, ``exllamav2``) on our layers.

Why a bridge instead of our own kernels: GPTQModel ships tuned Marlin and ExLlamaV2 GEMMs.  Its layers are built
from GPTQ tensors (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``) and repack them for the kernel in their
``post_init``.  So at load we unpack our checkpoint buffers (any of our packings), write the GPTQ tensors GPTQModel
expects, let its ``post_init`` repack them, and delegate ``forward`` to its layer.  Our persistent checkpoint
buffers stay as they are, so ``state_dict()`` still saves our format.

Facts about GPTQModel 7.6.x that this module relies on (paths are in the ``gptqmodel`` package):

* Before ``post_init`` every GPTQ layer holds ``qweight`` int32 ``[in * bits / 32, out]``, ``qzeros`` int32
  ``[G, out * bits / 32]``, ``scales`` ``[G, out]`` and ``g_idx`` int32 ``[in]``: the layout of our ``gptq``
  packer (``nn_modules/qlinear/__init__.py``, ``_register_gptq_buffers``; ``marlin.py``, ``MarlinLinear.__init__``).
* Kernels with ``REQUIRES_FORMAT_V2 = True`` (ExLlamaV2, the pure-torch ``TorchLinear``) read zero points as-is
  ("v2"): GPTQModel adds one to every v1 zero point before their ``post_init`` (``utils/model.py``,
  ``convert_gptq_v1_to_v2_format_module``), and their dequantization is ``scale * (q - zero)``
  (``nn_modules/qlinear/__init__.py``, ``_dequantize_from_codes``).  Marlin (``REQUIRES_FORMAT_V2 = False``)
  ignores ``qzeros``: it is symmetric-only with the zero point fixed at ``2^(bits-1)``.  So one set of tensors,
  :func:`gptqmodel_tensors` (v2 zero points), feeds all three.
* ``nn_modules/qlinear/torch.py`` (``TorchLinear``) takes the same tensors and runs on CPU, which is how the
  conversion is proven without a GPU (``integration_tests/gptqmodel_kernel_worker.py``).

This module imports without gptqmodel installed; gptqmodel itself is imported in ``post_init`` only.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..packing import get_packer
from ..quant.int import QuantizedTensor
from .base import QuantLinear
from .registry import missing_requirement

__all__ = [
    "GPTQMODEL_REQUIREMENT",
    "GptqModelQuantLinear",
    "build_gptq_layer",
    "cuda_capabilities",
    "cuda_home",
    "cuda_toolkit_reason",
    "gptqmodel_tensors",
    "import_gptqmodel",
    "nvcc_version_reason",
    "platform_reason",
]

# 7.6.x is the last gptqmodel series that installs next to torch 2.13, and the one whose layer contract we follow.
GPTQMODEL_REQUIREMENT = "gptqmodel>=7.6,<7.7"

GPTQ_TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


def gptqmodel_tensors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The GPTQ tensors a GPTQModel layer holds before its ``post_init``, from our codes / scales / zeros.

    ``qweight`` int32 ``[in * bits / 32, out]`` and ``qzeros`` int32 ``[G, out * bits / 32]`` (one little-endian
    bit stream per 32 values, see :mod:`signround.packing.bits`), ``scales`` ``[G, out]`` in ``qt``'s scale dtype
    (copying into the kernel's buffer casts it to the kernel's dtype), ``g_idx`` ``[in]`` = ``i // group_size``.
    Zero points are stored as-is (GPTQ "v2", GPTQModel's internal format), not minus one as in v1 checkpoints.
    That is our ``gptq_v2`` packing, except that ``scales`` keep ``qt``'s dtype: the packer stores fp16, and a
    bf16 kernel should get bf16 checkpoint scales unrounded.  Needs ``in`` and ``out`` to be multiples of 32.
    """
    fp16_scales = QuantizedTensor(qt.codes, qt.scales.half(), qt.zeros, qt.spec)  # scales replaced below
    tensors = get_packer("gptq_v2").pack(fp16_scales)
    tensors["scales"] = qt.scales.t().contiguous()
    return tensors


def import_gptqmodel(module: str) -> ModuleType:
    """Import a gptqmodel module, or raise ImportError with the pip line when the required version is missing.

    The process environment comes back as it was.  Importing gptqmodel 7.6.0 rewrites it: ``HF_HOME`` and the hub
    cache variables point to a folder under /tmp (its tokenizer helper's), and ``PYTORCH_ALLOC_CONF``,
    ``CUDA_DEVICE_ORDER``, ``KMP_DUPLICATE_LIB_OK`` and ``TORCHINDUCTOR_CACHE_DIR`` are set.  Its kernels need none
    of these, while the user's process and every subprocess it starts would inherit them, for instance a hub cache
    that is not theirs, or another GPU numbering where CUDA starts after the load.
    """
    if reason := missing_requirement(GPTQMODEL_REQUIREMENT):
        raise ImportError(reason)
    environment = dict(os.environ)
    try:
        return importlib.import_module(module)
    finally:
        for name in os.environ.keys() - environment.keys():
            del os.environ[name]
        for name, value in environment.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def build_gptq_layer(cls: type[nn.Module], qt: QuantizedTensor, compute_dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """A GPTQModel GPTQ layer of class ``cls`` on ``qt``'s device, its buffers filled from ``qt`` (no ``post_init``).

    Built without bias (our wrapper adds its own, in the activation dtype) and without act-order (our packers refuse
    permuted ``g_idx``).  A shape mismatch between GPTQModel's buffers and ours raises, naming the buffer: that
    would mean GPTQModel changed its layout.
    """
    out_features, in_features = qt.codes.shape
    spec = qt.spec
    with torch.device(qt.codes.device):  # GPTQModel allocates its buffers with the default device
        layer = cls(
            bits=spec.bits,
            group_size=spec.group_size,
            desc_act=False,
            sym=spec.sym,
            in_features=in_features,
            out_features=out_features,
            bias=False,
            pack_dtype=torch.int32,
            dtype=compute_dtype,
            **kwargs,
        )
    with torch.no_grad():
        for name, tensor in gptqmodel_tensors(qt).items():
            target = getattr(layer, name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{cls.__name__}.{name} has shape {tuple(target.shape)}, expected {tuple(tensor.shape)}: "
                    f"this gptqmodel's layer layout differs from the one signround supports ({GPTQMODEL_REQUIREMENT})"
                )
            target.data.copy_(tensor)
    return layer


@cache
def cuda_capabilities() -> tuple[tuple[int, int], ...]:
    """Compute capability of every visible CUDA device (empty without CUDA); cached, selection runs per layer."""
    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))


def platform_reason(kernel: str, platforms: tuple[str, ...]) -> str | None:
    """Why GPTQModel's ``kernel`` cannot run on this OS or on ROCm (both kernels are NVIDIA-only), or None."""
    if sys.platform not in platforms:
        return f"GPTQModel's {kernel} kernel runs on {list(platforms)}, not {sys.platform!r}"
    if torch.version.hip:
        return f"GPTQModel's {kernel} kernel does not support ROCm"
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit's folder, found as torch's ``cpp_extension`` finds it for a build: ``CUDA_HOME`` or
    ``CUDA_PATH``, else the folder above ``nvcc`` on ``PATH``, else ``/usr/local/cuda`` (on Windows the first
    ``CUDA/v*`` under Program Files) if it exists.  Written out rather than imported: importing
    ``torch.utils.cpp_extension`` imports setuptools, which is slow and fails outright in a process that already
    loaded the standard library's distutils."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is not None:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return os.path.dirname(os.path.dirname(nvcc))
    if sys.platform == "win32":
        found = sorted(glob.glob("C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA/v*.*"))
        return found[0] if found else None
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda") else None


@cache
def cuda_toolkit_reason() -> str | None:
    """Why GPTQModel cannot build its CUDA kernels here (no CUDA toolkit), or None.

    GPTQModel 7.6 ships Marlin and ExLlamaV2 as CUDA sources and compiles them at first use, through torch's
    ``cpp_extension`` (``gptqmodel/utils/cpp.py``; cached under ``~/.cache/gptqmodel``).  Without ``nvcc`` that
    build fails inside ``post_init``, halfway through ``from_pretrained``.  A pip-only CUDA install has no
    ``nvcc``, so selection rules these kernels out first and the layer goes to the next backend.
    """
    home = cuda_home()
    if home is None:
        return (
            "GPTQModel compiles its CUDA kernels at first use and needs the CUDA toolkit's nvcc, which was not found "
            "(install the CUDA toolkit, or set CUDA_HOME)"
        )
    nvcc = "nvcc.exe" if sys.platform == "win32" else "nvcc"
    if not (Path(home) / "bin" / nvcc).exists():
        return f"GPTQModel compiles its CUDA kernels at first use and needs nvcc; CUDA_HOME={home} has no bin/{nvcc}"
    return nvcc_version_reason(Path(home) / "bin" / nvcc)


def nvcc_version_reason(nvcc: Path) -> str | None:
    """Why torch's ``cpp_extension`` would refuse to build with ``nvcc`` for this torch, or None: it runs
    ``nvcc --version`` and refuses a CUDA major version other than the one torch was built with (12.x against
    torch's 13.0, say; another minor only warns).  A CPU build of torch has nothing to compare."""
    if not torch.version.cuda:
        return None
    try:
        banner = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"GPTQModel compiles its CUDA kernels at first use with {nvcc}, which does not run ({exc})"
    release = re.search(r"release (\d+)\.(\d+)", banner.stdout)
    torch_major = torch.version.cuda.split(".")[0]
    if release is None or release.group(1) == torch_major:
        return None  # torch's build check passes an nvcc whose banner has no release either
    return (
        f"GPTQModel compiles its CUDA kernels at first use with {nvcc}, CUDA {release.group(1)}.{release.group(2)}, "
        f"and torch will not build with it for this torch's CUDA {torch.version.cuda} (install a CUDA "
        f"{torch_major}.x toolkit, or set CUDA_HOME to one)"
    )


_log = logging.getLogger(__name__)


@cache  # once per kernel and process, as the registry logs each choice once
def note_first_build(kernel: str) -> None:
    """One INFO line per kernel and process before its first build, which can take minutes: a silent
    ``from_pretrained`` that long looks hung."""
    _log.info(
        "signround: the %s layers run GPTQModel's CUDA kernel, which it compiles on first use: the first build "
        "takes minutes, later loads reuse ~/.cache/gptqmodel",
        kernel,
    )


class GptqModelQuantLinear(QuantLinear):
    """A QuantLinear whose ``forward`` runs a GPTQModel layer built in ``post_init`` by :meth:`_build_kernel`.

    The GPTQModel layer is kept out of the module tree (stored in ``__dict__``, not registered as a submodule):
    its repacked tensors must not reach ``state_dict()`` (the checkpoint holds only our buffers), nor
    ``parameters()`` or transformers' weight handling.  The cost is that ``.to()`` does not move it; a move of our
    buffers to another device drops it instead, and the next ``forward`` rebuilds it there.

    On an accelerator, once the kernel is built, the checkpoint-format tensors move to CPU memory (the GPU keeps
    only the kernel's copy); ``state_dict()`` and rebuilding after a device move read that CPU copy.
    """

    compute_dtype: torch.dtype = torch.float16  # the dtype the kernel computes in; set by post_init
    # Devices on which the checkpoint-format tensors move to CPU once the kernel is built: the kernel holds its own
    # repacked copy, and two copies of every weight on a GPU would halve the model size that fits.
    offload_checkpoint_on: tuple[str, ...] = ("cuda", "xpu")

    def _build_kernel(self, qt: QuantizedTensor) -> nn.Module:
        """Build the GPTQModel layer for ``qt`` (already ``post_init``-ed); set ``self.compute_dtype``."""
        raise NotImplementedError(f"{type(self).__name__} must implement _build_kernel()")

    @property
    def kernel(self) -> nn.Module | None:
        """The GPTQModel layer ``forward`` delegates to (None before ``post_init``, or after a device move)."""
        return self.__dict__.get("_gptqmodel_layer")

    def _buffer_device(self) -> torch.device:
        if self.checkpoint_offloaded:
            return self.device_marker.device
        layout = self.packer.tensor_shapes_dtypes(self.spec, self.in_features, self.out_features)
        return getattr(self, next(iter(layout))).device

    def post_init(self) -> None:
        qt = self.quantized_tensor()
        note_first_build(self.backend_name)
        self.__dict__["_gptqmodel_layer"] = self._build_kernel(qt)
        self.__dict__["_gptqmodel_device"] = qt.codes.device
        if qt.codes.device.type in self.offload_checkpoint_on:
            self.offload_checkpoint()

    def _apply(self, fn, recurse: bool = True):
        """After ``.to()`` / ``.cuda()`` etc. moved our buffers, drop the kernel built on the old device."""
        result = super()._apply(fn, recurse)
        built_on = self.__dict__.get("_gptqmodel_device")
        if built_on is not None and self._buffer_device() != built_on:
            self.__dict__["_gptqmodel_layer"] = None
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if kernel is None:
            if self.__dict__.get("_gptqmodel_device") is None:
                raise RuntimeError(f"{type(self).__name__}: call post_init() after loading the weights")
            self.post_init()  # the buffers moved to another device since the kernel was built
            kernel = self.kernel
        y = kernel(x.to(self.compute_dtype).contiguous()).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y
