"""CPU backend for 2/3/4/8-bit layers on our own matrix-vector kernel (``native.c``), compiled for this CPU.

Why a kernel of our own next to torch_int4 (``aten._weight_int4pack_mm_for_cpu``): decode reads every weight once
per token, so bytes per weight and the arithmetic per byte decide, and aten's kernel loses on both.

* Bytes: aten's kernel reads a bf16 ``[scale, offset]`` pair per group, 4 bytes per 32 weights at G32 on top of
  16 bytes of codes, and cannot reproduce the checkpoint's fp16 scales, so torch_int4 keeps a second, exact copy:
  0.344 of fp16 bytes at W4G32.  This kernel reads the checkpoint's own scales (fp16: 2 bytes per group) and zero
  points (one byte, asymmetric layers only): 0.281 of fp16 at sym W4G32, and nothing else stays resident.
* Arithmetic: codes are laid out so that each input pair of 64 output rows is one cache line, read strictly in
  order, and the zero point leaves the inner loop (``sum (q - z) x = sum q x - z sum x``, the group sums of ``x``
  computed once per call), so the inner loop is a nibble unpack and a float32 FMA.
* Activations stay in their dtype: float32 models are not rounded to bf16 on the way in (aten's kernel is only
  fast for bf16 inputs), so the result matches the torch reference to float32 summation order.

The library is built at first use by :mod:`.cbuild` (``cc -O3 -march=native -fopenmp``); without a C compiler,
or if the built kernel fails its self-test, :func:`kernel_problem` says so and selection falls back to torch_int4
/ torch_int8.  Long inputs (prefill) take the dense path of :class:`RepackedQuantLinear` from ``DENSE_MIN_ROWS``
rows on.  2- and 3-bit codes are held as 4-bit ones (any code below 16 is the same arithmetic); 8-bit codes take a
byte each (torch_int8 makes one kernel call per group and takes symmetric layers only; this kernel reads the layer
in one pass, either kind).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LayerSpec
from .cbuild import BuildError, build_library
from .registry import Backend, register_backend
from .repacked import RepackedQuantLinear

__all__ = [
    "BLOCK_ROWS",
    "DENSE_MIN_ROWS",
    "NATIVE_BACKEND",
    "NativeQuantLinear",
    "kernel_problem",
    "load_kernel",
]

SOURCE = Path(__file__).with_name("native.c")
BLOCK_ROWS = 64  # output rows per block of the layout (BLOCK in native.c)
# Rows (tokens) from which dequantize + dense matmul beats the kernel, 4- and 8-bit codes alike: dense/kernel
# 0.96-1.11 at 48 rows on SmolLM2's shapes (bench/speed.py --crossover, docs/backends.md)
DENSE_MIN_ROWS = 48
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # SR_F32 / SR_BF16 / SR_F16
_LAYER_FIELDS = 9  # the C side's layer descriptor (L_FIELDS): K, N, G, codes, scales, half, zeros, zero, bits


def load_kernel(march: str = "native", defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled kernel library with its C signatures declared (raises :class:`BuildError`); ``march`` and
    ``defines`` select other builds (the tests check the portable loop and the hand-written fp16 conversions)."""
    lib = build_library(SOURCE, march, defines)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.signround_wq_gemm.argtypes = [p, i, i, p, p]
    lib.signround_wq_gemm.restype = i
    lib.signround_wq_dequant.argtypes = [p, p, i]
    lib.signround_wq_dequant.restype = None
    lib.signround_wq_layer_fields.argtypes = []
    lib.signround_wq_layer_fields.restype = i
    lib.signround_wq_simd.argtypes = []
    lib.signround_wq_simd.restype = i
    return lib


_gemm = None  # the loaded library's signround_wq_gemm: the decode path calls it without a lookup


@cache
def _library() -> ctypes.CDLL | str:
    global _gemm
    try:
        lib = load_kernel()
    except BuildError as err:
        return str(err)
    _gemm = lib.signround_wq_gemm
    return lib


def _loaded_library() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, str):
        raise BuildError(lib)
    return lib


@cache
def kernel_problem() -> str | None:
    """``None`` if the kernel compiled here and reproduces the torch reference on a probe layer, else why not."""
    lib = _library()
    if isinstance(lib, str):
        return f"native kernel unavailable: {lib.splitlines()[0]}"
    if lib.signround_wq_layer_fields() != _LAYER_FIELDS:
        return "native kernel built here reads another layer descriptor than native.py writes"
    from .torch import TorchQuantLinear  # the probe's reference

    cpu = torch.device("cpu")
    g = torch.Generator(cpu).manual_seed(0)
    for bits in (4, 8):  # asymmetric, 96 rows: a full block and a tail block of 32
        levels = 2**bits
        codes = torch.randint(0, levels, (96, 64), generator=g, dtype=torch.int32, device=cpu)
        scales = (torch.rand(96, 2, generator=g, device=cpu) * 0.01 + 0.001).half()
        zeros = torch.randint(0, levels, (96, 2), generator=g, dtype=torch.int32, device=cpu)
        qt = QuantizedTensor(codes, scales, zeros, LayerSpec(bits=bits, group_size=32, sym=False))
        x = torch.randn(3, 64, generator=g, device=cpu)
        expected = TorchQuantLinear.from_quantized(qt, "auto_round", None, torch.float32)(x)
        got = NativeQuantLinear.from_quantized(qt, "auto_round", None, torch.float32)(x)
        err = float((got - expected).abs().max() / expected.abs().max())
        if not err < 1e-5:
            return f"native kernel built here disagrees with the torch reference at {bits} bits (error {err:.2e})"
    return None


class NativeQuantLinear(RepackedQuantLinear):
    """2/3/4/8-bit layers through ``native.c``; repacked once at load into its row-block layout."""

    backend_name = "native"
    dense_min_rows: int = DENSE_MIN_ROWS
    compute_dtype = None  # float32 / bf16 / fp16 activations are read as they are
    keeps_exact_values = False  # the kernel reads the checkpoint's own scales and zero points

    def repack(self, qt: QuantizedTensor) -> None:
        _loaded_library()  # built (or its error raised) before any state changes
        out = self.out_features
        blocks = -(-out // BLOCK_ROWS)
        pad = blocks * BLOCK_ROWS - out
        codes = qt.codes.to(torch.uint8)
        # 2/3/4-bit codes two to a byte (input 2p in the low nibble, 2p + 1 in the high one); 8-bit ones a byte each
        self.code_bits = 8 if qt.spec.bits == 8 else 4
        packed = codes.contiguous() if self.code_bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)

        def by_block(table: torch.Tensor) -> torch.Tensor:  # [out, cols] -> [blocks, cols, 64], zero padding rows
            rows = F.pad(table, (0, 0, 0, pad))
            return rows.view(blocks, BLOCK_ROWS, -1).transpose(1, 2).contiguous()

        self.scale_dtype = qt.scales.dtype
        # fp16 scales as they are (2 bytes); anything else as float32, which holds bf16 / fp32 values exactly
        table_dtype = torch.float16 if qt.scales.dtype == torch.float16 else torch.float32
        self.register_buffer("native_codes", by_block(packed), persistent=False)
        self.register_buffer("native_scales", by_block(qt.scales.to(table_dtype)), persistent=False)
        zeros = None if self._uniform_zero is not None else by_block(qt.zeros.to(torch.uint8))
        self.register_buffer("native_zeros", zeros, persistent=False)
        self._refresh_pointers()

    def _refresh_pointers(self) -> None:
        """Write the kernel's per-layer arguments once (``layer_args``, an int64 tensor the C side reads as its
        layer descriptor): decode makes ~200 calls per token, and each ctypes argument and ``nn.Module`` attribute
        lookup costs time.  The layer keeps the tensors the addresses point into, so an address never outlives its
        memory; every way torch replaces buffers (``_apply``: ``.to()``, ``share_memory_()``; ``__setstate__``:
        deepcopy, pickling) rewrites the descriptor."""
        codes, scales, zeros = self.native_codes, self.native_scales, self.native_zeros
        fields = [
            self.in_features,
            self.out_features,
            self.group_size,
            codes.data_ptr(),
            scales.data_ptr(),
            int(scales.dtype == torch.float16),
            zeros.data_ptr() if zeros is not None else 0,
            self._uniform_zero or 0,
            self.code_bits,
        ]
        assert len(fields) == _LAYER_FIELDS
        self.layer_args = torch.tensor(fields, dtype=torch.int64, device="cpu")
        # 0 once the tables leave the CPU (a model moved with .to("cuda")): the C code reads host memory only
        self._layer_ptr = self.layer_args.data_ptr() if codes.device.type == "cpu" else 0
        self._kernel_tensors = (codes, scales, zeros)
        self._has_bias = self.bias is not None

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        if self.repacked:
            self._refresh_pointers()
        return result

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.repacked:
            self._refresh_pointers()

    def kernel_codes(self) -> torch.Tensor:
        rows = self.native_codes.transpose(1, 2).reshape(-1, self.native_codes.shape[1])[: self.out_features]
        if self.code_bits == 8:
            return rows
        return torch.stack([rows & 0xF, rows >> 4], dim=-1).view(self.out_features, self.in_features)

    def kernel_scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        def rows(table: torch.Tensor) -> torch.Tensor:  # [blocks, groups, 64] -> [out, groups]
            return table.transpose(1, 2).reshape(-1, table.shape[1])[: self.out_features]

        zeros = None if self.native_zeros is None else rows(self.native_zeros)
        return rows(self.native_scales).to(self.scale_dtype), zeros

    def dense_weight(self) -> torch.Tensor:
        """The base class's ``(q - zero) * scale`` (float32 products rounded once), computed by the C library in
        one parallel pass over the kernel's layout instead of decoding it with tensor ops.  Returned as the ``[out,
        in]`` view of an ``[in, out]`` tensor, the order the layout produces it in; ``F.linear`` reads it directly."""
        transposed = torch.empty(self.in_features, self.out_features, dtype=self.dense_dtype)
        _loaded_library().signround_wq_dequant(self._layer_ptr, transposed.data_ptr(), _DTYPE_CODES[transposed.dtype])
        return transposed.t()

    def kernel_forward(self, flat: torch.Tensor) -> torch.Tensor:
        return self._gemm_into(flat.contiguous(), flat.shape[0], flat.new_empty(flat.shape[0], self.out_features))

    def _gemm_into(self, x: torch.Tensor, rows: int, y: torch.Tensor) -> torch.Tensor:
        if not (x.is_cpu and self._layer_ptr):
            where = x.device if not x.is_cpu else self.native_codes.device
            raise RuntimeError(
                f"native runs on CPU only, got {where}; load the model for that device (its backend is then "
                "chosen for it) or pass quantization_config=AutoRoundConfig(backend=...)"
            )
        if _gemm(x.data_ptr(), _DTYPE_CODES[x.dtype], rows, self._layer_ptr, y.data_ptr()):
            raise MemoryError(f"native kernel could not allocate {rows} x {self.in_features} floats")
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode path, kept to the kernel call: each tensor op or attribute lookup here costs ~0.5-1 us, and
        # decode makes ~200 calls per token
        if x.dtype not in _DTYPE_CODES:  # float64 and the like: computed in float32
            return self.forward(x.float()).to(x.dtype)
        rows = x.numel() // self.in_features
        if rows >= self.dense_min_rows:
            return super().forward(x)
        y = self._gemm_into(x.contiguous(), rows, x.new_empty(*x.shape[:-1], self.out_features))
        return y + self.bias.to(y.dtype) if self._has_bias else y


def _shape_reason(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
    group = effective_group_size(spec.group_size, in_features)
    if group % 2:
        return f"group of {group} input features is odd (the kernel reads inputs in pairs)"
    return None


NATIVE_BACKEND = register_backend(
    Backend(
        name="native",
        quant_linear=NativeQuantLinear,
        devices=("cpu",),
        bits=(2, 3, 4, 8),  # 2/3-bit codes fit the 4-bit layout exactly
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        packings=None,  # any registered packer: post_init unpacks through it
        check=_shape_reason,
        priority=15,  # above torch_int4 (fewer bytes, faster per call, float32 activations kept)
        environment=kernel_problem,
    )
)
