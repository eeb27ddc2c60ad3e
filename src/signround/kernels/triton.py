"""Triton backend: our own fused dequantize + matmul kernel for 2/4/8-bit layers on CUDA and XPU.

Why a kernel of our own: the torch reference materialises the whole dense weight on every forward; this kernel
reads the packed codes (``bits / 8`` bytes per weight) and dequantizes them in registers, tile by tile, so the
dense weight never exists in memory.  It is portable (any GPU Triton targets) rather than the fastest: the
vendor kernels (Marlin, ExLlamaV2) rank above it when installed.

Layout, built once at ``post_init`` from the layer's codes (read back through the packer, so every registered
packing works) and kept in *non-persistent* buffers (the checkpoint-format buffers stay untouched, so saving
still writes the checkpoint layout):

* ``triton_weight`` int32 ``[ceil(in / P), out]``, ``P = 32 / bits`` codes per word: word ``[j, n]`` holds the
  codes of input rows ``j*P .. j*P+P-1`` of column ``n``, row ``j*P + i`` at bits ``[i*bits, (i+1)*bits)``.  For
  2/4/8 bits this is exactly the GPTQ ``qweight``, so for GPTQ-layout packings the checkpoint tensor itself is
  reused rather than copied (no extra memory);
* ``triton_scales`` ``[G, out]`` in the packer's scale dtype (fp16 for GPTQ-family checkpoints: no precision is
  lost) and ``triton_zeros`` uint8 ``[G, out]``.

The kernel computes ``w = (code - zero) * scale`` in fp32 — exact, because an fp16 scale times an integer below
2^8 fits fp32's mantissa — rounds ``w`` to the activation dtype (as the reference does: with fp32 and fp16
activations the weights are bit-identical to :func:`signround.quant.int.dequantize`; with bf16 the reference
rounds the scale to bf16 first, so it differs by up to a bf16 ulp) and accumulates ``x @ w`` in fp32 with
``tl.dot`` (IEEE fp32 products for fp32 activations, never TF32).  Grid: one program per ``BLOCK_M x BLOCK_N`` output
tile, looping over ``in_features`` in ``BLOCK_K`` steps; edge tiles are masked, so no shape constraint comes
from the tiling (the packings themselves need multiples of 32).

Triton is imported lazily, in :func:`load_kernel`: ``import signround`` must not pay for it (or fail without
it), and ``TRITON_INTERPRET=1`` — how the tests run the kernel on CPU — must be set before the kernel is defined.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..packing.bits import RUN, pack_int32
from ..quant.int import effective_group_size
from .base import QuantLinear
from .registry import Backend, register_backend

__all__ = [
    "BITS",
    "TRITON_BACKEND",
    "Tiles",
    "TritonQuantLinear",
    "default_tiles",
    "dequant_matmul",
    "load_kernel",
    "one_group_per_tile_slice",
    "pack_along_k",
]

BITS = (2, 4, 8)  # widths whose codes never straddle an int32 word: unpacking is one shift and mask
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ``triton.language``, published by :func:`load_kernel` before it defines the kernel: the kernel's body reads
# ``tl`` as a module global, the scope every Triton release resolves a kernel's names from.
tl: Any = None


@functools.cache
def load_kernel() -> tuple[Any, bool]:
    """``(jitted kernel, interpreted)``: imports Triton and defines the kernel on first use.

    ``interpreted``: the kernel was defined under ``TRITON_INTERPRET=1`` and so runs on CPU tensors (Triton's
    interpreter; slow, for tests).  Cached: call ``load_kernel.cache_clear()`` after changing the variable.
    The kernel calls only Triton builtins, never Triton's own jitted library functions (``tl.zeros``, ``tl.cdiv``):
    those are interpreted only if the variable was set before ``triton`` was first imported, and merely loading
    a transformers model imports it — so the variable need only be set before this function first runs.
    The module deliberately has no ``from __future__ import annotations``: Triton's interpreter recognises a
    ``tl.constexpr`` parameter only by its evaluated annotation, not by the annotation's source text.
    """
    global tl
    import triton
    import triton.language

    tl = triton.language

    @triton.jit
    def dequant_matmul_kernel(
        x_ptr,
        w_ptr,
        scales_ptr,
        zeros_ptr,
        bias_ptr,
        y_ptr,
        M,
        N,
        K,
        group_size,
        stride_xm,
        stride_ym,
        BITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ONE_GROUP_PER_TILE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
        UNPACK_ONCE: tl.constexpr,
    ):
        """``y[M, N] = x[M, K] @ dequant(w)[K, N] (+ bias)``; one program per output tile, fp32 accumulator.

        ``ONE_GROUP_PER_TILE``: every ``BLOCK_K`` slice of the input lies in one quantization group, so one row
        of scales / zeros serves the whole tile; otherwise each input row gathers its own group's row.
        ``DOT_IN_FP32``: feed ``tl.dot`` fp32 copies of the (already rounded) operands — only for bf16 under the
        interpreter, whose ``tl.dot`` multiplies bf16 bit patterns (triton-lang/triton#11584); the products are
        exact in fp32 either way, so the result is what a bf16 tensor-core dot with fp32 accumulation gives.
        ``UNPACK_ONCE``: load each packed word once and shift it into its ``32 / BITS`` codes in registers, instead
        of loading it once per code and relying on the cache; the same codes, a candidate for decode where the
        loads rather than the arithmetic may bound the kernel (``bench/gpu_kernels.py --triton-tiles``).
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M * K may pass 2^31 (long prompts)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see load_kernel
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            kn_ok = k_ok[:, None] & n_ok[None, :]
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if UNPACK_ONCE:  # BLOCK_K / P words per column, each shifted into its P codes: k = word * P + j
                offs_w = k0 // (32 // BITS) + tl.arange(0, BLOCK_K // (32 // BITS))
                w_ok = (offs_w < (K + (32 // BITS) - 1) // (32 // BITS))[:, None] & n_ok[None, :]
                words = tl.load(w_ptr + offs_w[:, None] * N + offs_n[None, :], mask=w_ok, other=0)
                shifts = tl.arange(0, 32 // BITS) * BITS
                codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # rows past K hold pack_along_k's zero padding
            else:  # a word is loaded once per code it holds (from cache); row k's code sits at bit (k % P) * BITS
                words = tl.load(w_ptr + (offs_k // (32 // BITS))[:, None] * N + offs_n[None, :], mask=kn_ok, other=0)
                codes = (words >> ((offs_k % (32 // BITS)) * BITS)[:, None]) & ((1 << BITS) - 1)
            if ONE_GROUP_PER_TILE:
                group_row = (k0 // group_size) * N + offs_n
                scales = tl.load(scales_ptr + group_row, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                zeros = tl.load(zeros_ptr + group_row, mask=n_ok, other=0).to(tl.int32)[None, :]
            else:
                group_rows = (offs_k // group_size)[:, None] * N + offs_n[None, :]
                scales = tl.load(scales_ptr + group_rows, mask=kn_ok, other=0.0).to(tl.float32)
                zeros = tl.load(zeros_ptr + group_rows, mask=kn_ok, other=0).to(tl.int32)
            w = ((codes - zeros).to(tl.float32) * scales).to(x.dtype)  # exact in fp32, then the reference's rounding
            if DOT_IN_FP32:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return dequant_matmul_kernel, type(dequant_matmul_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class Tiles:
    """Launch shape.  Triton's ``tl.dot`` needs every block dimension >= 16 and a power of two."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    unpack_once: bool = False  # see the kernel's UNPACK_ONCE


def default_tiles(m: int, group_size: int, dtype: torch.dtype = torch.float16) -> Tiles:
    """A fixed heuristic rather than autotuning (which would time every config on first call, and in the
    interpreter run each one): small ``BLOCK_M`` for decode (``m`` of a few tokens), wider tiles for prefill;
    ``BLOCK_K`` the largest of 128/64/32/16 dividing the group, so one scale row serves a tile.

    Register budgets, from the compiler for sm_80 and sm_90 (``bench/triton_compile.py``; a test keeps every
    default's spills to a register or two, which Triton 3.9 takes in two of them): 64-row tiles take 8 warps (with 4, a 64x64x128 tile spilled on sm_80), and fp32
    activations, whose exact ("ieee") dot needs far more registers, take ``BLOCK_K`` 32 and 8 warps.

    Decode (16 rows or fewer, fp16 / bf16) takes 32-wide output tiles and a 4-stage pipeline: of the 16 launch
    shapes ``bench/gpu_kernels.py --triton-tiles`` timed at one row on an H100 (2026-11-26, CUDA graph replays,
    W4G128 fp16), it was the fastest on 4096x4096 and 11008x4096 and within 15 % of the fastest on 4096x11008, and
    2.2x, 1.3x and 2.3x faster than the earlier 64-wide, 2-stage tile there: narrow tiles give a 4096-output layer
    128 programs for the 132 SMs, and deeper pipelining keeps more loads in flight."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 64 else 128
    num_stages = 2
    if m <= 16 and dtype != torch.float32:
        block_n, num_stages = 32, 4
    block_k = next((b for b in (128, 64, 32, 16) if group_size % b == 0), 64)
    if m > 64:
        block_k = min(block_k, 64)  # keeps a 64x128 tile's registers in budget
    num_warps = 4 if m <= 32 else 8
    if dtype == torch.float32:
        block_m, block_k, num_warps = min(block_m, 32), min(block_k, 32), 8
    return Tiles(block_m, block_n, block_k, num_warps=num_warps, num_stages=num_stages)


def one_group_per_tile_slice(group_size: int, block_k: int, in_features: int) -> bool:
    """Whether every ``block_k`` slice of the input lies in one quantization group (the kernel's
    ``ONE_GROUP_PER_TILE``: one scale row per tile instead of a gather per input row)."""
    return group_size % block_k == 0 or group_size >= in_features


def pack_along_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[out, in]`` (unsigned, < 2**bits) -> the kernel's int32 words ``[ceil(in / P), out]``, P = 32/bits.

    Input rows are zero-padded to a multiple of ``P``; the kernel masks rows ``>= in``, so padding is never read.
    """
    if bits not in BITS:
        raise ValueError(f"bits={bits} cannot be packed for the triton kernel; accepted: {list(BITS)}")
    in_features = codes.shape[1]
    # the GPTQ bit stream (packing.bits) along K: pad K to whole 32-value runs, keep the words that hold real rows
    padded = F.pad(codes.to(torch.int32), (0, -in_features % RUN))
    words = pack_int32(padded.t(), bits, dim=0)
    return words[: -(-in_features // (32 // bits))].contiguous()


def _device_context(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the *current* device: make it the tensors' one (matters with several GPUs)."""
    module = getattr(torch, device.type, None)
    if device.type in ("cuda", "xpu") and module is not None:
        return module.device(device)
    return contextlib.nullcontext()


def dequant_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(weight)^T (+ bias) -> [M, N]`` in ``x.dtype``, through the Triton kernel.

    ``weight``: :func:`pack_along_k` words ``[ceil(K / P), N]``; ``scales`` ``[G, N]`` (any float dtype);
    ``zeros`` ``[G, N]`` (any integer dtype); ``group_size``: the effective one (``K`` for per-channel).
    ``tiles`` overrides :func:`default_tiles` (tests use it to reach both scale-loading paths).
    """
    kernel, interpreted = load_kernel()
    if x.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "the triton backend runs on cuda / xpu tensors; on CPU only under Triton's interpreter "
            "(TRITON_INTERPRET=1 set before first use, for tests) — use the 'torch' backend on CPU"
        )
    if x.dtype not in DTYPES:
        raise ValueError(f"activation dtype {x.dtype} not in {[str(d) for d in DTYPES]}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    if weight.shape[0] != -(-k // (32 // bits)):
        raise ValueError(
            f"weight has {weight.shape[0]} rows of packed words; {bits}-bit codes of {k} inputs need "
            f"{-(-k // (32 // bits))}"
        )
    n = weight.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y  # an empty batch: nothing to launch
    t = tiles or default_tiles(m, group_size, x.dtype)
    one_group_per_tile = one_group_per_tile_slice(group_size, t.block_k, k)
    grid = (-(-m // t.block_m), -(-n // t.block_n))
    with _device_context(x.device):
        kernel[grid](
            x,
            weight,
            scales,
            zeros,
            bias if bias is not None else y,  # any pointer; unread when HAS_BIAS is false
            y,
            m,
            n,
            k,
            group_size,
            x.stride(0),
            y.stride(0),
            BITS=bits,
            BLOCK_M=t.block_m,
            BLOCK_N=t.block_n,
            BLOCK_K=t.block_k,
            ONE_GROUP_PER_TILE=one_group_per_tile,
            HAS_BIAS=bias is not None,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32: never TF32; halves: the default
            DOT_IN_FP32=interpreted and x.dtype == torch.bfloat16,
            UNPACK_ONCE=t.unpack_once,
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
    return y


class TritonQuantLinear(QuantLinear):
    """2/4/8-bit layers through the fused Triton dequantize + matmul kernel; repacked once at load."""

    backend_name = "triton"

    def post_init(self) -> None:
        qt = self.quantized_tensor()
        self.group_size = effective_group_size(self.spec.group_size, self.in_features)
        weight = pack_along_k(qt.codes, self.spec.bits)
        stored = getattr(self, "qweight", None)
        same_layout = isinstance(stored, torch.Tensor) and (stored.dtype, stored.shape) == (weight.dtype, weight.shape)
        if same_layout and torch.equal(stored, weight):
            weight = stored  # GPTQ-layout checkpoints already hold these words: share, don't copy
        if weight is not stored and weight.device.type != "cpu":
            self.offload_checkpoint()  # the kernel's words are a copy: keep one copy of the codes on the GPU
        self.register_buffer("triton_weight", weight, persistent=False)
        self.register_buffer("triton_scales", qt.scales.t().contiguous(), persistent=False)
        self.register_buffer("triton_zeros", qt.zeros.t().to(torch.uint8).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.stride(1) != 1:
            flat = flat.contiguous()
        y = dequant_matmul(
            flat,
            self.triton_weight,
            self.triton_scales,
            self.triton_zeros,
            self.bias,
            self.spec.bits,
            self.group_size,
        )
        return y.reshape(*shape[:-1], self.out_features)


TRITON_BACKEND = register_backend(
    Backend(
        name="triton",
        quant_linear=TritonQuantLinear,
        devices=("cuda", "xpu"),
        bits=BITS,
        dtypes=DTYPES,
        packings=None,  # any registered packer: post_init unpacks through it
        group_sizes=None,  # any group dividing in_features (the packer checks that), per-channel (-1) included
        priority=2,  # below the vendor kernels (marlin 6, exllamav2 5), above the torch reference (0)
        requires=("triton>=3.0",),
        # masked edge tiles: no divisibility of its own (the GPTQ-family packings still need multiples of 32)
    )
)
