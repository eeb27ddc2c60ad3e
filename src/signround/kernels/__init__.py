"""Inference kernels: the QuantLinear contract, backend descriptors, and ``select()``.

Importing this package registers every built-in backend (only the pure-PyTorch one so far).
"""

from . import torch as _torch_backend  # noqa: F401  (registers the "torch" backend)
from .base import QuantLinear
from .registry import Backend, backend_names, candidates, get_backend, register_backend, select

__all__ = ["Backend", "QuantLinear", "backend_names", "candidates", "get_backend", "register_backend", "select"]
