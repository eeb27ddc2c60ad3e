"""GGUF quantization types as data, and the containers for what a quantized weight stores.

Conventions (llama.cpp's ``ggml-common.h``, so that files interoperate bit for bit):

* A weight ``[rows, cols]`` is quantized row by row in blocks of ``block_size`` consecutive weights: 32 for the
  legacy types, 256-weight *super-blocks* of 16 or 8 sub-blocks for the K-quants; ``cols`` must be a multiple.
* Every weight has an unsigned ``code`` in ``[0, 2^bits - 1]``; what it dequantizes to is spelled out in
  ``signround.quant.gguf``'s docstring, and which fields carry the scales in ``GGUFQuantized``'s.

The block math itself lives in ``gguf_search`` (how llama.cpp picks the values) and ``gguf_blocks`` (how they are
laid out in bytes); this module only says what there is to pick and to lay out, so that both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "GGUF_TYPES",
    "GROUP_MAX_EPS",
    "Blocks",
    "GGUFQuantized",
    "GGUFScales",
    "GGUFType",
    "blocks_of",
    "check_shape",
    "gguf_type",
    "quantized_of",
]

GROUP_MAX_EPS = float(np.float32(1e-15))  # llama.cpp's "all zero" threshold for a (sub-)block's largest magnitude


@dataclass(frozen=True)
class GGUFType:
    """One GGUF quantization type, as data.

    ``ggml_type``: gguf-py's ``GGMLQuantizationType`` value (the number written in the file).
    ``block_size`` weights take ``type_size`` bytes; each weight has a ``bits``-bit code; ``code_offset`` is the
    code of 0 for the symmetric types.  ``sub_block``: weights sharing one integer scale (the whole block for legacy
    types, whose scale is an fp16); ``scale_bits``: bits of those integer sub-block scales (0 for legacy types).
    ``layout``: the block struct's fields in file order, ``(name, bytes)``, as in ``ggml-common.h``.
    """

    name: str
    ggml_type: int
    block_size: int
    type_size: int
    bits: int
    code_offset: int
    has_min: bool
    sub_block: int
    scale_bits: int
    layout: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        if sum(n for _, n in self.layout) != self.type_size:
            raise ValueError(f"{self.name}: layout {self.layout} does not add up to {self.type_size} bytes")

    @property
    def is_k_quant(self) -> bool:
        return self.scale_bits > 0

    @property
    def n_sub(self) -> int:
        return self.block_size // self.sub_block

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def scale_dtype(self) -> torch.dtype:
        """Integer sub-block scales are signed for the K-quants without mins (q3_k, q6_k)."""
        return torch.int8 if self.is_k_quant and not self.has_min else torch.uint8

    @property
    def scale_range(self) -> tuple[int, int]:
        if self.scale_dtype == torch.int8:
            return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1
        return 0, 2**self.scale_bits - 1


_LEGACY, _K = 32, 256
GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("q4_0", 2, _LEGACY, 18, 4, 8, False, _LEGACY, 0, (("d", 2), ("qs", 16))),
        GGUFType("q4_1", 3, _LEGACY, 20, 4, 0, True, _LEGACY, 0, (("d", 2), ("m", 2), ("qs", 16))),
        GGUFType("q5_0", 6, _LEGACY, 22, 5, 16, False, _LEGACY, 0, (("d", 2), ("qh", 4), ("qs", 16))),
        GGUFType("q5_1", 7, _LEGACY, 24, 5, 0, True, _LEGACY, 0, (("d", 2), ("m", 2), ("qh", 4), ("qs", 16))),
        GGUFType("q8_0", 8, _LEGACY, 34, 8, 128, False, _LEGACY, 0, (("d", 2), ("qs", 32))),
        GGUFType("q2_k", 10, _K, 84, 2, 0, True, 16, 4, (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))),
        GGUFType("q3_k", 11, _K, 110, 3, 4, False, 16, 6, (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))),
        GGUFType("q4_k", 12, _K, 144, 4, 0, True, 32, 6, (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))),
        GGUFType(
            "q5_k", 13, _K, 176, 5, 0, True, 32, 6, (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128))
        ),
        GGUFType("q6_k", 14, _K, 210, 6, 32, False, 16, 8, (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))),
    )
}


def gguf_type(name: str) -> GGUFType:
    """The registered type called ``name`` (case-insensitive, e.g. ``"Q4_K"``)."""
    t = GGUF_TYPES.get(name.lower())
    if t is None:
        raise ValueError(f"unknown GGUF type {name!r}; supported: {', '.join(GGUF_TYPES)}")
    return t


def check_shape(shape: tuple[int, ...], t: GGUFType) -> tuple[int, int]:
    """``(rows, cols)`` of a weight ``t`` can store; raises ValueError naming the fix otherwise."""
    if len(shape) != 2:
        raise ValueError(f"{t.name} quantizes 2-D weights [rows, cols]; got shape {tuple(shape)}")
    rows, cols = shape
    if cols % t.block_size or cols == 0:
        raise ValueError(
            f"{t.name} stores each row in blocks of {t.block_size} weights, so the row length must be a positive "
            f"multiple of {t.block_size} ({t.block_size}, {2 * t.block_size}, ...); got rows of {cols}"
            + ("; pad the row or use a legacy type (blocks of 32)" if t.is_k_quant and cols % 32 == 0 else "")
        )
    return rows, cols


@dataclass
class GGUFQuantized:
    """A ``[rows, cols]`` weight quantized in a GGUF type, with the parameters exactly as the file stores them
    (``n_blocks = cols // block_size``, ``n_sub`` sub-blocks per K-quant super-block):

    * ``codes``: uint8 ``[rows, cols]``, unsigned codes in ``[0, 2^bits - 1]`` (see ``GGUFType.code_offset``);
    * ``d``: float16 ``[rows, n_blocks]``: the block scale (legacy) or super-block scale of the scales (K);
    * ``m``: float16 ``[rows, n_blocks]``, q4_1 / q5_1 only: the block minimum, added;
    * ``dmin``: float16 ``[rows, n_blocks]``, q2_k / q4_k / q5_k only: the super-block scale of the mins;
    * ``scales``: ``GGUFType.scale_dtype`` ``[rows, n_blocks, n_sub]``, K-quants only: integer multipliers of ``d``
      (q3_k's signed value, not its stored ``+ 32``);
    * ``mins``: uint8 ``[rows, n_blocks, n_sub]``, q2_k / q4_k / q5_k only: integer multipliers of ``dmin``,
      subtracted.

    These are the values a tuner can change; ``to_bytes`` writes them unchanged.
    """

    type_name: str
    shape: tuple[int, int]
    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t = gguf_type(self.type_name)
        self.type_name = t.name
        rows, cols = self.shape = tuple(self.shape)  # type: ignore[assignment]
        blocks, subs = (rows, cols // t.block_size), (rows, cols // t.block_size, t.n_sub)
        expected = {
            "codes": ((rows, cols), torch.uint8),
            "d": (blocks, torch.float16),
            "m": (blocks, torch.float16) if t.has_min and not t.is_k_quant else None,
            "dmin": (blocks, torch.float16) if t.has_min and t.is_k_quant else None,
            "scales": (subs, t.scale_dtype) if t.is_k_quant else None,
            "mins": (subs, torch.uint8) if t.has_min and t.is_k_quant else None,
        }
        for field, spec in expected.items():
            value = getattr(self, field)
            if spec is None:
                if value is not None:
                    raise ValueError(f"{t.name} has no {field!r}; got a tensor for it")
            elif value is None or tuple(value.shape) != spec[0] or value.dtype != spec[1]:
                got = None if value is None else (tuple(value.shape), value.dtype)
                raise ValueError(f"{t.name}: {field!r} must be {spec[1]} of shape {spec[0]}, got {got}")

    @property
    def type(self) -> GGUFType:
        return GGUF_TYPES[self.type_name]


class GGUFScales(NamedTuple):
    """The float sub-block scales (and mins) of a ``[rows, cols]`` weight, before llama.cpp stores them: what its
    search finds (``gguf.search_scales``) and what a tuner hands back (``gguf.quantize_with_scales``).  One
    convention for every type: a weight is about ``scales * (code - code_offset) - mins``.

    * ``scales``: float32 ``[rows, n_blocks, n_sub]``: the legacy types' float32 block scale ``d`` (``n_sub == 1``;
      negative for q4_0 / q5_0 when the largest magnitude is positive) or the K-quants' sub-block scales;
    * ``mins``: float32 like ``scales``, types with a min only: q4_1 / q5_1's negated block minimum (so
      ``m = -mins``), the K-quants' sub-block mins (subtracted, ``dmin * mins`` once stored); None otherwise;
    * ``codes``: uint8 ``[rows, cols]``, K-quants only: the search's own codes, which llama.cpp keeps where a
      stored step ``d * scales`` is 0 (they do not change those weights' values, only the bytes); None otherwise.
    """

    scales: torch.Tensor
    mins: torch.Tensor | None = None
    codes: torch.Tensor | None = None


class Blocks(NamedTuple):
    """``GGUFQuantized``'s fields flattened to ``N`` blocks: codes ``[N, block_size]``, d / m / dmin ``[N]``,
    scales / mins ``[N, n_sub]``.  The block math works on this form: every block is independent."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None


def blocks_of(q: GGUFQuantized) -> Blocks:
    """``q``'s fields as ``Blocks`` (views, no copies)."""
    t, n = q.type, q.d.numel()

    def flat(v: torch.Tensor | None, *tail: int) -> torch.Tensor | None:
        return None if v is None else v.reshape(n, *tail)

    return Blocks(q.codes.reshape(n, t.block_size), q.d.reshape(n), flat(q.m), flat(q.dmin),
                  flat(q.scales, t.n_sub), flat(q.mins, t.n_sub))  # fmt: skip


def quantized_of(t: GGUFType, shape: tuple[int, int], b: Blocks) -> GGUFQuantized:
    """Inverse of ``blocks_of`` for a ``shape`` weight in ``t``."""
    rows, cols = shape
    per_row = cols // t.block_size
    fields = {k: None if v is None else v.reshape(rows, per_row, *v.shape[1:]) for k, v in b._asdict().items()}
    fields["codes"] = b.codes.reshape(rows, cols)
    return GGUFQuantized(t.name, (rows, cols), **fields)
