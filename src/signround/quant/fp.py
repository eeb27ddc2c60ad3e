"""Floating-point weight formats as pure tensor math: MXFP4 / MXFP8, NVFP4 and FP8 (per channel, per tensor, 128x128).

A weight ``[out, in]`` is cut into blocks of ``FPFormat.block`` (rows, cols; -1 = the whole dimension); every block
shares one scale and each weight becomes a small float *element* ``x / scale`` cast to the element grid.  The codes
kept are the elements' raw bit patterns, one per uint8 (fp4 unpacked), so packers only re-arrange bytes.

Element grids (sign, exponent, mantissa bits; subnormals; ``max`` is the saturation point):

* E2M1 (fp4): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; no inf / NaN.
* E4M3 (``torch.float8_e4m3fn``): max 448, smallest subnormal 2^-9; only S.1111.111 is NaN.
* E5M2 (``torch.float8_e5m2``): max 57344; IEEE-style inf / NaN (none of the registered formats uses it).

Casting to a grid is round-to-nearest-even with saturation to ``±max`` (what ``Tensor.to(torch.float8_*)`` and
compressed-tensors' ``cast_to_fp4`` do; checked in tests/test_quant_fp.py).  The sign of zero follows IEEE: a small
negative value becomes -0 (code 0x8 in fp4, 0x80 in fp8), as torch's casts and compressed-tensors' fp4 packer do.

Scales (``ScaleKind``):

* E8M0 (MX formats): a power of two ``2^(byte - 127)`` stored as its biased exponent byte; 0 is 2^-127, 254 is 2^127,
  255 is NaN and refused.  Blocks of 32 along the input dimension (OCP Microscaling spec v1.0).  The exponent is
  computed exactly (bit-level ``frexp``, not a float ``log2``) from the block's largest magnitude ``amax``:

  - ``mxfp4`` / ``mxfp8``: ``floor(log2(amax)) - emax_elem`` (emax_elem = 2 for E2M1, 8 for E4M3): the OCP spec's
    rule, which lets the top of a block saturate (``amax / scale`` up to 8 > 6 in fp4).  gguf-py 0.19 /
    llama.cpp's ``quantize_row_mxfp4_ref`` and the reference's ``quant_mx`` use it too (in float ``log2``, which can
    round up for an ``amax`` within an ulp below a power of two).
  - ``mxfp4_rceil`` / ``mxfp8_rceil``: ``ceil(log2(amax / max_elem))``, the smallest power of two with
    ``max_elem * scale >= amax``, so no element saturates: NVIDIA's rule (TransformerEngine's MXFP8 recipe,
    ``float_to_e8m0(amax / max_norm)`` rounded up) and the reference's ``quant_mx_rceil``.  The reference's
    MXFP4_RCEIL / MXFP8_RCEIL *schemes* use rceil for activations only; their weights use the OCP rule.
  - compressed-tensors 0.20.1 (``generate_mx_scales``) uses neither: it first rounds ``amax`` to one mantissa bit
    (half up) and then takes ``floor(log2) - emax_elem``, i.e. one more than OCP when ``amax``'s mantissa is >= 1.75.
    Its decompression is plain ``2^(byte - 127)``, so our scales load there unchanged.

  An all-zero block gets byte 0, as in llama.cpp.
* E4M3 (NVFP4, compressed-tensors' convention, checked against its 0.20.1 compressor): one float32 global scale per
  tensor ``global = 448 * 6 / amax(tensor)`` (evaluated, as there, as ``(1 / amax) * 2688``; 1.0 for an all-zero
  tensor), blocks of 16 with ``scale = e4m3(global * (amax_block / 6))`` (saturating; a zero scale becomes 0.125,
  compressed-tensors' eps), and ``w = e2m1 * (scale / global)``.  Fused layers (q/k/v, gate/up) must share one
  global scale for vLLM: pass it as ``global_scale``.
* FP32 (FP8 weights): ``scale = amax / 448`` in float32 per output channel (``fp8``, the reference's FP8_STATIC
  weights), per tensor (``fp8_tensor``, the reference's FPW8A16) or per 128x128 block (``fp8_block``, DeepSeek-V3 /
  compressed-tensors' block strategy, edge blocks partial as if zero-padded).  A zero block gets float32's eps, as
  compressed-tensors.  (compressed-tensors keeps the scale in the observer's dtype, often bf16; a packer that
  stores bf16 scales changes the dequantized values and must say so.)

All arithmetic is float32, one IEEE operation at a time, in compressed-tensors' order: ``x / (scale / global)``,
``amax / 6`` then ``* global``.  Scales come from float32 ``amax`` (compressed-tensors' observers see the weight's own
dtype: with bf16 min / max its global scale and ``amax / 6`` are rounded to bf16, e.g. a global of 840 for 839.18).

Tuning (``fake_quant``): ``v`` (per weight, in [-0.5, 0.5]) shifts the element before rounding by ``v`` times the grid
spacing at that element (``x / scale + v * step(x / scale)``), so +-0.5 reaches the neighbouring grid point in every
binade (the reference adds ``v`` unscaled: +-0.5 is a whole step in fp4's lowest binade, 1/64 of one in fp8's top).  ``alpha`` / ``beta`` (per block) shrink the block's negative /
positive extreme before the scale is computed, as int.py's clipping.  Rounding of elements, of the E8M0 exponent
and of the E4M3 scale pass gradients straight through; saturation stops them.  The forward value is bit for bit
``dequantize(quantize(...))``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ACT_FORMATS",
    "E2M1",
    "E4M3",
    "E5M2",
    "FORMATS",
    "BlockedWeight",
    "ElementFormat",
    "FPFormat",
    "FPQuantized",
    "ScaleKind",
    "block_scales",
    "dequantize",
    "e8m0_to_float",
    "fake_quant",
    "fake_quant_input",
    "fp_format",
    "from_codes",
    "from_gguf_mxfp4",
    "grid_step",
    "input_scale",
    "nvfp4_global_scale",
    "pack_fp4",
    "quantize",
    "round_to_grid",
    "to_codes",
    "to_gguf_mxfp4",
    "unpack_fp4",
]

NVFP4_ZERO_SCALE = 0.125  # compressed-tensors' replacement for an e4m3 block scale that rounds to 0
FP32_ZERO_SCALE = torch.finfo(torch.float32).eps  # compressed-tensors' replacement for a zero float32 scale
_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class ElementFormat:
    """A small float type: 1 sign bit, ``ebits`` exponent bits with ``bias``, ``mbits`` mantissa bits, subnormals.

    ``max``: largest finite value (casts saturate there).  ``specials``: which codes are not numbers: ``"none"``
    (E2M1), ``"fn"`` (only S.1...1.1...1 is NaN: E4M3), ``"ieee"`` (all-ones exponent is inf / NaN: E5M2).
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    specials: Literal["none", "fn", "ieee"]

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (``floor(log2(max))``): the OCP spec's ``emax_elem``."""
        return math.floor(math.log2(self.max))


E2M1 = ElementFormat("e2m1", ebits=2, mbits=1, bias=1, max=6.0, specials="none")
E4M3 = ElementFormat("e4m3", ebits=4, mbits=3, bias=7, max=448.0, specials="fn")
E5M2 = ElementFormat("e5m2", ebits=5, mbits=2, bias=15, max=57344.0, specials="ieee")


class ScaleKind(str, Enum):
    """How a block's scale is stored (see the module docstring)."""

    E8M0 = "e8m0"  # uint8 biased exponent of a power of two
    E4M3 = "e4m3"  # float8_e4m3fn, divided by the tensor's float32 global scale
    FP32 = "fp32"  # float32


_SCALE_DTYPES = {ScaleKind.E8M0: torch.uint8, ScaleKind.E4M3: torch.float8_e4m3fn, ScaleKind.FP32: torch.float32}


@dataclass(frozen=True)
class FPFormat:
    """One floating-point weight format, as data.

    ``block``: (rows, cols) of weights sharing a scale, -1 = the whole dimension.  ``rceil``: E8M0 exponent rounded
    up (no saturation) instead of the OCP rule.  ``partial_blocks``: edge blocks may be smaller (the weight need not
    be a multiple of the block); otherwise a non-multiple is refused, as the packed layouts need whole blocks.
    """

    name: str
    element: ElementFormat
    block: tuple[int, int]
    scale: ScaleKind
    rceil: bool = False
    partial_blocks: bool = False

    def __post_init__(self) -> None:
        if self.rceil and self.scale is not ScaleKind.E8M0:
            raise ValueError(f"{self.name}: rceil applies to E8M0 scales only, not {self.scale.value}")
        if any(b == 0 or b < -1 for b in self.block):
            raise ValueError(f"{self.name}: block={self.block} must hold positive sizes or -1 (whole dimension)")

    @property
    def has_global_scale(self) -> bool:
        return self.scale is ScaleKind.E4M3


FORMATS: dict[str, FPFormat] = {
    f.name: f
    for f in (
        FPFormat("mxfp4", E2M1, (1, 32), ScaleKind.E8M0),
        FPFormat("mxfp4_rceil", E2M1, (1, 32), ScaleKind.E8M0, rceil=True),
        FPFormat("mxfp8", E4M3, (1, 32), ScaleKind.E8M0),
        FPFormat("mxfp8_rceil", E4M3, (1, 32), ScaleKind.E8M0, rceil=True),
        FPFormat("nvfp4", E2M1, (1, 16), ScaleKind.E4M3),
        FPFormat("fp8", E4M3, (1, -1), ScaleKind.FP32),
        FPFormat("fp8_tensor", E4M3, (-1, -1), ScaleKind.FP32),
        FPFormat("fp8_block", E4M3, (128, 128), ScaleKind.FP32, partial_blocks=True),
    )
}


# Activation-only block shapes (the weight formats serve activations too): FP8_BLOCK's inputs get one float32 scale
# per token and 128 input features, a partial last block allowed (DeepSeek-V3's / the reference's act_group_size=128).
ACT_FORMATS: dict[str, FPFormat] = {
    "fp8_act128": FPFormat("fp8_act128", E4M3, (1, 128), ScaleKind.FP32, partial_blocks=True),
}


def fp_format(fmt: str | FPFormat) -> FPFormat:
    """The registered format of that name (case-insensitive; weight or activation format), or ``fmt`` itself."""
    if isinstance(fmt, FPFormat):
        return fmt
    found = FORMATS.get(str(fmt).lower()) or ACT_FORMATS.get(str(fmt).lower())
    if found is None:
        raise ValueError(f"unknown floating-point format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return found


@dataclass
class FPQuantized:
    """A weight ``[out, in]`` in a floating-point format, exactly as a checkpoint stores it (unpacked).

    * ``codes``: uint8 ``[out, in]``, the element bit patterns (fp4: one per byte, sign in bit 3);
    * ``scales``: ``[R, C]`` per block (``R``, ``C`` = blocks along out / in): uint8 E8M0 exponents, float8_e4m3fn
      or float32 (per channel ``[out, 1]``, per tensor ``[1, 1]``);
    * ``global_scale``: float32 ``[1]`` (NVFP4) or None;  ``fmt``: the format.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    fmt: FPFormat

    def __post_init__(self) -> None:
        self.fmt = fp_format(self.fmt)
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise ValueError(
                f"{self.fmt.name}: codes must be 2-D uint8, got {self.codes.dtype} {tuple(self.codes.shape)}"
            )
        grid = _Grid.of(self.fmt, self.shape)
        want = ((grid.n_rows, grid.n_cols), _SCALE_DTYPES[self.fmt.scale])
        if (tuple(self.scales.shape), self.scales.dtype) != want:
            raise ValueError(
                f"{self.fmt.name}: scales must be {want[1]} of shape {want[0]}, got "
                f"{self.scales.dtype} of shape {tuple(self.scales.shape)}"
            )
        if self.fmt.has_global_scale != (self.global_scale is not None):
            raise ValueError(
                f"{self.fmt.name}: global_scale must be {'given' if self.fmt.has_global_scale else 'None'}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- element math
_EXPONENT_BITS = 0x7F800000  # a float32's exponent field: the value with its mantissa cleared is 2^floor(log2)


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` for ``a > 0``, exact (from the float's exponent, subnormals included); int32."""
    return torch.frexp(a)[1] - 1


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** e`` as float32 for integer ``e`` in [-149, 127], built from its bits (no ``pow`` rounding)."""
    e = e.to(torch.int32)
    normal = (e + 127).clamp(min=1) << 23
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, subnormal).view(torch.float32)


def grid_step(x: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Spacing of ``elem``'s grid at ``x`` (float32): ``2^(binade - mbits)``; 0 and subnormals get the subnormal
    spacing, values beyond ``max`` the top binade's.  This is the unit of the tuning offset ``v``.

    Computed from the float32 bits: ``|x|`` clamped to ``[2^emin, max]`` with its mantissa bits cleared is exactly
    ``2^binade``, then times ``2^-mbits`` (exact): three elementwise passes where ``frexp`` and an integer
    power of two took eight, on the hot path of every fp tuning step."""
    a = x.float().abs().clamp(2.0**elem.emin, elem.max)
    return (a.view(torch.int32) & _EXPONENT_BITS).view(torch.float32) * 2.0 ** (-elem.mbits)


def round_to_grid(x: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Nearest value of ``elem``'s grid to float32 ``x``: ties to even mantissa, saturating at ``±max``, IEEE sign of
    zero.  ``|x| / step`` is exact (the step is a power of two), so ``torch.round``'s half-to-even is the
    mantissa's."""
    a = x.abs().clamp(max=elem.max)
    step = grid_step(a, elem)
    return torch.copysign(torch.round(a / step) * step, x)


def to_codes(values: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """Bit patterns (uint8) of float32 ``values`` that lie on ``elem``'s grid (``round_to_grid``'s output)."""
    a = values.abs()
    subnormal = a < 2.0**elem.emin
    binade = torch.where(subnormal, elem.emin, _floor_log2(a.clamp(min=_TINY)))
    units = (a / _pow2(binade - elem.mbits)).to(torch.int32)  # the significand as an integer
    mantissa = torch.where(subnormal, units, units - (1 << elem.mbits))
    exponent = torch.where(subnormal, 0, binade + elem.bias)
    sign = torch.signbit(values).to(torch.int32)
    return ((sign << (elem.ebits + elem.mbits)) | (exponent << elem.mbits) | mantissa).to(torch.uint8)


@functools.cache
def _value_table(elem: ElementFormat) -> torch.Tensor:
    """float32 value of every code of ``elem`` (NaN / inf where the format says so)."""
    values = []
    for code in range(1 << elem.bits):
        negative = code >> (elem.ebits + elem.mbits)
        exponent = (code >> elem.mbits) & ((1 << elem.ebits) - 1)
        mantissa = code & ((1 << elem.mbits) - 1)
        top = exponent == (1 << elem.ebits) - 1
        if elem.specials == "ieee" and top:
            value = math.nan if mantissa else math.inf
        elif elem.specials == "fn" and top and mantissa == (1 << elem.mbits) - 1:
            value = math.nan
        elif exponent == 0:
            value = math.ldexp(mantissa, elem.emin - elem.mbits)
        else:
            value = math.ldexp((1 << elem.mbits) + mantissa, exponent - elem.bias - elem.mbits)
        values.append(-value if negative else value)
    return torch.tensor(values, dtype=torch.float32)


def from_codes(codes: torch.Tensor, elem: ElementFormat) -> torch.Tensor:
    """float32 values of uint8 ``codes`` of ``elem`` (a table lookup)."""
    return _value_table(elem).to(codes.device)[codes.long()]


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """float32 ``2^(byte - 127)`` of uint8 E8M0 ``exponents``; byte 255 (NaN) is refused."""
    if exponents.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8 exponent bytes, got {exponents.dtype}")
    if bool((exponents == 255).any()):
        raise ValueError("E8M0 scale byte 255 is NaN; a valid scale exponent is 0..254")
    return _pow2(exponents.to(torch.int32) - 127)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 ``[1]`` per-tensor scale ``448 * 6 / amax`` from the largest magnitude(s) ``amax`` (the max of
    several tensors' gives the shared scale of fused layers); 1.0 when everything is zero, as compressed-tensors."""
    a = amax.detach().float().reshape(-1).amax().clamp(min=_TINY)
    # a Python number over a tensor is (1 / a) * c in torch, as in compressed-tensors' generate_gparam: same bits
    scale = (E4M3.max * E2M1.max) / a
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)


# ------------------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class _Grid:
    """How a ``shape`` weight is cut into ``n_rows x n_cols`` blocks of ``rows x cols`` (edge blocks zero-padded)."""

    shape: tuple[int, int]
    rows: int
    cols: int
    n_rows: int
    n_cols: int

    @classmethod
    def of(cls, fmt: FPFormat, shape: tuple[int, ...]) -> _Grid:
        if len(shape) != 2:
            raise ValueError(f"{fmt.name}: expected a 2-D weight [out, in], got shape {tuple(shape)}")
        out_f, in_f = shape
        rows = out_f if fmt.block[0] == -1 else fmt.block[0]
        cols = in_f if fmt.block[1] == -1 else fmt.block[1]
        if not fmt.partial_blocks and (out_f % rows or in_f % cols):
            raise ValueError(f"{fmt.name}: weight shape {tuple(shape)} is not a multiple of the block {(rows, cols)}")
        return cls((out_f, in_f), rows, cols, -(-out_f // rows), -(-in_f // cols))

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` -> ``[n_rows, rows, n_cols, cols]`` (a view unless padding is needed)."""
        pad_rows, pad_cols = self.n_rows * self.rows - self.shape[0], self.n_cols * self.cols - self.shape[1]
        if pad_rows or pad_cols:
            x = F.pad(x, (0, pad_cols, 0, pad_rows))
        return x.reshape(self.n_rows, self.rows, self.n_cols, self.cols)

    def unblocks(self, xb: torch.Tensor) -> torch.Tensor:
        """Inverse of ``blocks`` (contiguous: padding is cut off by a copy)."""
        x = xb.reshape(self.n_rows * self.rows, self.n_cols * self.cols)
        return x[: self.shape[0], : self.shape[1]].contiguous()

    def per_block(self, t: torch.Tensor | None, name: str) -> torch.Tensor | None:
        """A per-block parameter as ``[n_rows, n_cols]`` float32 (a single value broadcasts)."""
        if t is None:
            return None
        if t.numel() == 1:
            return t.float().reshape(1, 1)
        if t.numel() != self.n_rows * self.n_cols:
            raise ValueError(f"{name} has {t.numel()} values; expected one per block ({self.n_rows} x {self.n_cols})")
        return t.float().reshape(self.n_rows, self.n_cols)


def _shared_exponent(amax: torch.Tensor, fmt: FPFormat) -> torch.Tensor:
    """The E8M0 scale exponent (int32, in [-127, 127]) of blocks whose largest magnitude is ``amax``."""
    elem = fmt.element
    floor_log2 = _floor_log2(torch.where(amax > 0, amax, 1.0))
    e = floor_log2 - elem.emax
    if fmt.rceil:
        # amax in [2^f, 2^(f+1)) and max_elem * 2^(f - emax) in [2^f, 2^(f+1)): the smallest k with
        # max_elem * 2^k >= amax is f - emax, or one more; max_elem * 2^k is exact, so the comparison is
        e = e + (amax > elem.max * _pow2(e.clamp(min=-149))).to(torch.int32)
    return torch.where(amax > 0, e, -127).clamp(-127, 127)


def _block_scales(
    amax: torch.Tensor, fmt: FPFormat, global_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stored scales [R, C], float32 divisor [R, C])`` for blocks of largest magnitude ``amax``; the divisor is
    differentiable in ``amax`` (straight through the exponent / e4m3 rounding) and equals what ``dequantize``
    rebuilds from the stored scales, bit for bit."""
    a = amax.detach()
    if fmt.scale is ScaleKind.E8M0:
        e = _shared_exponent(a, fmt)
        divisor = _pow2(e)
        if amax.requires_grad:  # d divisor / d amax = divisor / amax, as if the exponent were not rounded
            safe = torch.where(a > 0, a, 1.0)
            divisor = divisor * torch.where(a > 0, amax / safe, 1.0)  # the ratio is exactly 1.0 forward
        return (e + 127).to(torch.uint8), divisor
    if fmt.scale is ScaleKind.E4M3:
        assert global_scale is not None
        raw = global_scale * (amax / fmt.element.max)
        scale = round_to_grid(raw.detach(), E4M3)
        scale = torch.where(scale == 0, NVFP4_ZERO_SCALE, scale)
        stored = scale.to(torch.float8_e4m3fn)
        if raw.requires_grad:
            scale = scale + (raw - raw.detach())
        return stored, scale / global_scale
    scale = amax / fmt.element.max
    scale = torch.where(scale > 0, scale, FP32_ZERO_SCALE)
    return scale.detach().clone(), scale


def block_scales(q: FPQuantized) -> torch.Tensor:
    """The float32 multiplier of each block ``[R, C]``: ``2^(e - 127)``, ``e4m3 / global`` or the float32 scale."""
    if q.fmt.scale is ScaleKind.E8M0:
        return e8m0_to_float(q.scales)
    if q.fmt.scale is ScaleKind.E4M3:
        assert q.global_scale is not None
        return q.scales.float() / q.global_scale.float()
    return q.scales.float()


def _check_weight(w: torch.Tensor, fmt: FPFormat) -> None:
    if not w.is_floating_point():
        raise ValueError(f"{fmt.name}: the weight must be a float tensor, got {w.dtype}")


def _check_finite(w: torch.Tensor, extremes: tuple[torch.Tensor, ...], fmt: FPFormat) -> None:
    """A NaN or inf anywhere in ``w`` reaches its block's max / min (both propagate NaN), so the check reads the
    per-block extremes (one value per block) instead of the whole tensor; the count is taken on failure only."""
    if not all(bool(torch.isfinite(e).all()) for e in extremes):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{fmt.name}: the weight has {bad} NaN or inf values; cannot quantize it")


def _check_global_scale(g: torch.Tensor | float) -> torch.Tensor:
    g = torch.as_tensor(g, dtype=torch.float32).detach().reshape(-1)
    if g.numel() != 1 or not bool(torch.isfinite(g).all()) or float(g) <= 0:
        raise ValueError(f"global_scale must be one positive finite float32 value, got {g.tolist()}")
    return g


class BlockedWeight:
    """A weight cut into its format's blocks, with the per-block extremes (and NVFP4's global scale) computed once.

    Tuning calls the fake quantizer hundreds of times on one weight with only ``v``, ``alpha``, ``beta`` changing,
    so the finiteness check, the blocking and the reductions happen here once.  The weight keeps its dtype (bf16 /
    fp16 widen exactly to the float32 the arithmetic runs in).
    """

    def __init__(self, w: torch.Tensor, fmt: str | FPFormat, global_scale: torch.Tensor | float | None = None):
        self.fmt = fmt = fp_format(fmt)
        _check_weight(w, fmt)
        self.grid = _Grid.of(fmt, tuple(w.shape))
        self.dtype = w.dtype
        self.wb = self.grid.blocks(w if w.dtype in (torch.float32, torch.bfloat16, torch.float16) else w.float())
        wmax, wmin = self.wb.amax(dim=(1, 3)).float(), self.wb.amin(dim=(1, 3)).float()
        _check_finite(w, (wmax, wmin), fmt)
        self.wmax, self.wmin = wmax.clamp(min=0), wmin.clamp(max=0)
        self.global_scale: torch.Tensor | None = None
        if fmt.has_global_scale:
            self.global_scale = (
                nvfp4_global_scale(torch.maximum(self.wmax, -self.wmin))
                if global_scale is None
                else _check_global_scale(global_scale).to(w.device)
            )
        elif global_scale is not None:
            raise ValueError(f"{fmt.name} has no global scale; got global_scale={global_scale!r}")

    def _qdq(
        self, v: torch.Tensor | None, alpha: torch.Tensor | None, beta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grid values [R, rows, C, cols], divisor [R, 1, C, 1], stored scales)``, all float32 but the scales."""
        elem, grid = self.fmt.element, self.grid
        alpha, beta = grid.per_block(alpha, "alpha"), grid.per_block(beta, "beta")
        high = self.wmax if beta is None else self.wmax * beta
        low = -self.wmin if alpha is None else -self.wmin * alpha
        stored, divisor = _block_scales(torch.maximum(high, low), self.fmt, self.global_scale)
        divisor = divisor[:, None, :, None]
        x = self.wb / divisor
        if v is not None:
            x = x + grid.blocks(v.reshape(grid.shape).float()) * grid_step(x.detach(), elem)
        x = x.clamp(-elem.max, elem.max)
        q = round_to_grid(x.detach(), elem)
        if x.requires_grad:
            q = q + (x - x.detach())  # straight through the rounding; exactly q forward
        return q, divisor, stored

    def fake_quant(
        self, v: torch.Tensor | None = None, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The quantized-dequantized weight ``[out, in]`` in the weight's dtype, differentiable in ``v`` / ``alpha``
        / ``beta`` (and the weight)."""
        q, divisor, _ = self._qdq(v, alpha, beta)
        return self.grid.unblocks(q * divisor).to(self.dtype)

    @torch.no_grad()
    def quantize(
        self, v: torch.Tensor | None = None, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None
    ) -> FPQuantized:
        """Codes and scales of exactly the values ``fake_quant`` gives."""
        q, _, stored = self._qdq(v, alpha, beta)
        codes = to_codes(self.grid.unblocks(q), self.fmt.element)
        gs = None if self.global_scale is None else self.global_scale.clone()
        return FPQuantized(codes=codes, scales=stored, global_scale=gs, fmt=self.fmt)


# --------------------------------------------------------------------------------------------------- public API
def quantize(
    w: torch.Tensor,
    fmt: str | FPFormat,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    global_scale: torch.Tensor | float | None = None,
) -> FPQuantized:
    """Quantize ``w`` ``[out, in]`` to ``fmt`` (name or ``FPFormat``); see the module docstring for the rules.

    ``v``: rounding offsets (``w``'s shape); ``alpha`` / ``beta``: per-block shrink factors of the negative /
    positive extreme; ``global_scale``: NVFP4's shared per-tensor scale (default: from ``w``).
    """
    return BlockedWeight(w, fmt, global_scale).quantize(v, alpha, beta)


def fake_quant(
    w: torch.Tensor,
    fmt: str | FPFormat,
    v: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    global_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(...), w.dtype)``, differentiable: straight-through rounding, so gradients reach ``v``,
    ``alpha``, ``beta`` (through the scale) and ``w``."""
    return BlockedWeight(w, fmt, global_scale).fake_quant(v, alpha, beta)


def fake_quant_input(
    x: torch.Tensor,
    fmt: str | FPFormat,
    *,
    global_scale: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Activations ``[..., in]`` quantized-dequantized on the fly in ``fmt``'s blocks along the last dimension (each
    token its own rows), in ``x``'s dtype.  ``scale``: a calibrated float32 per-tensor scale (static FP8: elements
    ``x / scale`` on the grid, never re-derived from ``x``); ``global_scale``: NVFP4's calibrated global scale (its
    block scales stay dynamic).  Gradients pass straight through to ``x`` (tuning trains the layers upstream)."""
    fmt = fp_format(fmt)
    flat = x.reshape(-1, x.shape[-1])
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
        q = round_to_grid((flat.detach().float() / s).clamp(-fmt.element.max, fmt.element.max), fmt.element) * s
    else:
        q = BlockedWeight(flat.detach(), fmt, global_scale).fake_quant().float()
    q = q.to(x.dtype).reshape(x.shape)
    return x + (q - x).detach() if x.requires_grad else q


def input_scale(amax: torch.Tensor | float, fmt: str | FPFormat) -> torch.Tensor:
    """The calibrated float32 ``[1]`` activation scale of a static format from the inputs' largest magnitude:
    NVFP4's global scale ``448 * 6 / amax`` (``nvfp4_global_scale``), else the per-tensor divisor ``amax / max``
    (FP8_STATIC's ``input_scale``; float32's eps for silent inputs, as compressed-tensors)."""
    fmt = fp_format(fmt)
    a = torch.as_tensor(amax, dtype=torch.float32).detach().reshape(-1).amax()
    if fmt.has_global_scale:
        return nvfp4_global_scale(a)
    s = a / fmt.element.max
    return torch.where(s > 0, s, FP32_ZERO_SCALE).reshape(1)


def dequantize(q: FPQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``element * block multiplier`` as a dense ``[out, in]`` tensor: computed in float32, rounded once to ``dtype``
    (compressed-tensors' NVFP4 decompression does the same in float32 and returns bf16)."""
    grid = _Grid.of(q.fmt, q.shape)
    values = grid.blocks(from_codes(q.codes, q.fmt.element))
    return grid.unblocks(values * block_scales(q)[:, None, :, None]).to(dtype)


# ------------------------------------------------------------------------------------------------- byte layouts
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """fp4 codes ``[..., n]`` -> uint8 ``[..., n / 2]``, element ``2i`` in the low nibble and ``2i + 1`` in the high
    one: compressed-tensors' / vLLM's ``*fp4_pack_quantized`` layout (``pack_fp4_to_uint8``)."""
    if codes.dtype != torch.uint8 or codes.shape[-1] % 2 or bool((codes > 15).any()):
        raise ValueError(
            f"pack_fp4 needs uint8 codes < 16 with an even last dimension, got {codes.dtype} {codes.shape}"
        )
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``: uint8 ``[..., n / 2]`` -> fp4 codes ``[..., n]``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 needs uint8 bytes, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _check_gguf_mxfp4(fmt: FPFormat) -> None:
    if fmt.element != E2M1 or fmt.scale is not ScaleKind.E8M0 or fmt.block != (1, 32):
        raise ValueError(f"GGUF MXFP4 stores E2M1 elements with E8M0 scales per 32; {fmt.name} is not that")


def to_gguf_mxfp4(q: FPQuantized) -> np.ndarray:
    """The tensor's data as GGUF's MXFP4 type stores it: uint8 ``[out, in / 32 * 17]``, per block of 32 the E8M0
    byte then 16 bytes whose byte ``j`` holds element ``j`` (low nibble) and element ``j + 16`` (high nibble).

    -0 (code 8) is written as +0: llama.cpp's quantizer takes the first of equal candidates, never -0 (both
    dequantize to 0).  Ties are another matter: llama.cpp rounds an element exactly halfway between two grid
    points toward zero, ours to even, so the bytes match llama.cpp's own quantizer except at exact ties."""
    _check_gguf_mxfp4(q.fmt)
    rows, cols = q.shape
    codes = q.codes.reshape(rows, cols // 32, 2, 16)
    codes = torch.where(codes == 8, 0, codes)
    nibbles = codes[:, :, 0] | (codes[:, :, 1] << 4)
    data = torch.cat([q.scales.reshape(rows, cols // 32, 1), nibbles], dim=-1)
    return data.reshape(rows, cols // 32 * 17).cpu().numpy()


def from_gguf_mxfp4(data: np.ndarray, shape: tuple[int, int], fmt: str | FPFormat = "mxfp4") -> FPQuantized:
    """Inverse of ``to_gguf_mxfp4`` for a ``shape`` weight (``data``: its bytes in any shape)."""
    fmt = fp_format(fmt)
    _check_gguf_mxfp4(fmt)
    rows, cols = shape
    if cols % 32 or data.dtype != np.uint8 or data.size != rows * cols // 32 * 17:
        raise ValueError(
            f"GGUF MXFP4 {tuple(shape)}: need {rows * cols // 32 * 17} uint8 bytes, got {data.size} of {data.dtype}"
        )
    raw = torch.from_numpy(np.ascontiguousarray(data).reshape(rows, cols // 32, 17))
    nibbles = raw[:, :, 1:]
    codes = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=2).reshape(rows, cols)
    return FPQuantized(codes=codes, scales=raw[:, :, 0].clone(), global_scale=None, fmt=fmt)
