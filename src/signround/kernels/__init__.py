"""Inference kernels: the QuantLinear contract, backend descriptors, and ``select()``.

Importing this package registers every built-in backend.
"""

from . import exllamav2 as _exllamav2_backend  # noqa: F401  (registers "exllamav2"; GPTQModel's kernel, CUDA)
from . import hpu as _hpu_backend  # noqa: F401  (registers "hpu")
from . import ipex as _ipex_backend  # noqa: F401  (registers "ipex")
from . import marlin as _marlin_backend  # noqa: F401  (registers "marlin"; GPTQModel's kernel, CUDA)
from . import native as _native_backend  # noqa: F401  (registers "native"; compiled at first use)
from . import torch as _torch_backend  # noqa: F401  (registers the "torch" backend)
from . import torch_fp as _torch_fp_backend  # noqa: F401  (registers "torch_fp": MX / NVFP4 / FP8 layers)
from . import torch_int4 as _torch_int4_backend  # noqa: F401  (registers "torch_int4")
from . import torch_int8 as _torch_int8_backend  # noqa: F401  (registers "torch_int8")
from . import triton as _triton_backend  # noqa: F401  (registers "triton"; imports triton lazily)
from .base import QuantLinear
from .registry import Backend, backend_names, candidates, get_backend, register_backend, select

__all__ = ["Backend", "QuantLinear", "backend_names", "candidates", "get_backend", "register_backend", "select"]
