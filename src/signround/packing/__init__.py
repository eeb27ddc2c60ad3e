"""Checkpoint formats: one Packer per on-disk layout, looked up by its ``packing_format`` name.

Importing this package registers every built-in format.
"""

from . import (
    auto_round,  # noqa: F401  (registers "auto_round", "auto_round:auto_gptq")
    auto_round_fp,  # noqa: F401  (registers "auto_round:llm_compressor", "auto_round:fp8_static", "auto_round:fp8")
    awq,  # noqa: F401  (registers "awq_gemm")
    compressed_tensors,  # noqa: F401  (registers "pack-quantized")
    compressed_tensors_fp,  # noqa: F401  (registers "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized", "float-quantized")
    gptq,  # noqa: F401  (registers "gptq", "gptq_v2")
)
from .registry import Packer, TensorLayout, get_packer, packer_names, register_packer

__all__ = ["Packer", "TensorLayout", "get_packer", "packer_names", "register_packer"]
