"""GGUF block quantization arithmetic: llama.cpp's legacy and K-quant types as pure tensor math.

This is the quant/ layer of the GGUF export and its one public entry point: it turns a float weight into exactly
the blocks llama.cpp stores, and back.  The container is written elsewhere (gguf-py's ``GGUFWriter``); nothing here
does I/O or touches modules.  The work is done by three sibling modules, one job each:

* ``gguf_types``: the type registry (``GGUFType``, ``GGUF_TYPES``) and the containers ``GGUFQuantized`` (the
  stored values) and ``GGUFScales`` (the float scales before they are stored);
* ``gguf_search``: llama.cpp's reference quantizers, C-faithful to the bit, in two stages (search, then store);
* ``gguf_blocks``: the on-disk block structs (``to_bytes`` / ``from_bytes``).

What a stored weight means (llama.cpp's ``ggml-common.h`` / ``dequantize_row_*``): every weight has an unsigned
``code`` in ``[0, 2^bits - 1]`` and dequantizes to ``S * (code - code_offset)``, then ``+ m`` (legacy ``_1`` types)
or ``- dmin * mins[j]`` (K-quants with mins):

* ``q4_0 q5_0 q8_0``: ``S = d``, an fp16 per block; offsets 8 / 16 / 128 (q8_0 stores ``code - 128`` as int8);
* ``q4_1 q5_1``: ``S = d`` and the fp16 block minimum ``m``; offset 0;
* ``q2_k q4_k q5_k``: ``S = d * scales[j]``, fp16 super-block ``d`` / ``dmin`` and unsigned 4-bit (q2_k) or 6-bit
  integer ``scales`` / ``mins`` per sub-block ``j``; offset 0;
* ``q3_k q6_k``: ``S = d * scales[j]``, signed 6-bit (q3_k, stored as ``+ 32``) or 8-bit integer scales; offsets
  4 / 32.

``d * scales[j]`` and ``dmin * mins[j]`` are exact in float32 (an fp16 times a small integer), so a dequantized
weight is rounded by the multiplication and by the min's addition only, as in llama.cpp's ``dequantize_row_*``.

``quantize`` is llama.cpp's reference quantizer (what ``llama-quantize`` runs without an importance matrix), or
with ``importance`` (an importance matrix row: the per-input-column mean of ``x^2`` over calibration activations,
what ``llama-imatrix`` computes) its ``quant_weights`` path (``quantize_row_*_impl``), which weighs every search by
it and, for q2_k..q5_k, also the storing of the sub-block scales; q8_0 ignores it, as llama.cpp does.  A
tuner replaces its first stage: ``search_scales`` gives the float scales (and mins) llama.cpp's search finds, as a
starting point; ``quantize_with_scales`` stores tuned ones exactly as llama.cpp's second stage would (integer
sub-block scales against fp16 super-block scales, every code recomputed from the stored values), with an optional
per-weight rounding offset.  ``quantize(w, t)`` is ``quantize_with_scales(w, t, *search_scales(w, t))``.

Checked byte for byte against llama.cpp's ``ggml_quantize_chunk`` (llama-cpp-python 0.3.36's libggml-base) and
against gguf-py's numpy (de)quantizers: see tests/test_quant_gguf.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from .gguf_blocks import from_bytes, to_bytes
from .gguf_search import WEIGHTED_STORE, BlockScales, search_blocks, search_weights, store_blocks
from .gguf_types import GGUF_TYPES, Blocks, GGUFQuantized, GGUFScales, GGUFType, check_shape, gguf_type, quantized_of

__all__ = [
    "GGUF_TYPES",
    "GGUFQuantized",
    "GGUFScales",
    "GGUFType",
    "dequantize",
    "from_bytes",
    "gguf_type",
    "quantize",
    "quantize_with_scales",
    "search_scales",
    "search_weights_of",
    "to_bytes",
]

CHUNK_ELEMENTS = 1 << 20  # quantize about a million weights at a time: the search keeps ~a dozen float32 copies

_Joined = TypeVar("_Joined", Blocks, BlockScales)


def _by_rows(rows: int, cols: int, fn: Callable[[slice], _Joined]) -> _Joined:
    """``fn`` over row slices of about ``CHUNK_ELEMENTS`` weights (one empty slice when ``rows == 0``), joined: the
    search keeps many float32 copies of what it works on, so a slice bounds the memory, not the whole weight."""
    parts = [fn(r) for r in _row_slices(rows, cols)]
    return type(parts[0])(*(None if v[0] is None else torch.cat(v) for v in zip(*parts, strict=True)))


def _as_float32(w: torch.Tensor, type_name: str) -> tuple[GGUFType, int, int, torch.Tensor]:
    t = gguf_type(type_name)
    rows, cols = check_shape(tuple(w.shape), t)
    return t, rows, cols, w.detach().to(torch.float32)


def _importance(importance: torch.Tensor | None, cols: int, x: torch.Tensor) -> torch.Tensor | None:
    """``importance`` as float32 ``[cols]`` on ``x``'s device, checked; None stays None."""
    if importance is None:
        return None
    if tuple(importance.shape) != (cols,) or not importance.is_floating_point():
        raise ValueError(
            f"importance must be float of shape ({cols},), got {importance.dtype} {tuple(importance.shape)}"
        )
    return importance.detach().to(x.device, torch.float32)


def _weights(t: GGUFType, x: torch.Tensor, r: slice, imp: torch.Tensor | None) -> torch.Tensor | None:
    """The importance path's search weights of rows ``r`` (None without an importance, and for q8_0)."""
    return None if imp is None else search_weights(t, x[r], imp)


@torch.no_grad()
def search_weights_of(w: torch.Tensor, type_name: str, importance: torch.Tensor) -> torch.Tensor | None:
    """float32 ``[rows, cols]``: what llama.cpp's importance path weighs each weight of ``w`` by in its search
    (``gguf_search.search_weights``), None for q8_0 (no search weights).  A tuner's stage 2 sums them per
    sub-block to store its scales as llama.cpp would."""
    t, rows, cols, x = _as_float32(w, type_name)
    imp = _importance(importance, cols, x)
    if t.name == "q8_0":
        return None
    return torch.cat([search_weights(t, x[r], imp).reshape(-1, cols) for r in _row_slices(rows, cols)])


def _row_slices(rows: int, cols: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [slice(r, r + step) for r in range(0, max(rows, 1), step)]


@torch.no_grad()
def quantize(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> GGUFQuantized:
    """llama.cpp's quantization of ``w [rows, cols]`` (any float dtype, taken as float32 like ``llama-quantize``
    does) to ``type_name``: its reference quantizer without ``importance``, its importance-matrix path with one
    (float ``[cols]``, the per-input-column mean of ``x^2``; see the module docstring).  Raises ValueError if
    ``cols`` is not a multiple of the type's block size.  Rows are processed in slices of about
    ``CHUNK_ELEMENTS`` weights."""
    t, rows, cols, x = _as_float32(w, type_name)
    imp = _importance(importance, cols, x)

    def chunk(r: slice) -> Blocks:
        xb, qw = x[r].reshape(-1, t.block_size), _weights(t, x, r, imp)
        return store_blocks(t, xb, search_blocks(t, xb, qw), None, qw)

    return quantized_of(t, (rows, cols), _by_rows(rows, cols, chunk))


@torch.no_grad()
def search_scales(w: torch.Tensor, type_name: str, importance: torch.Tensor | None = None) -> GGUFScales:
    """The first stage of ``quantize``: the float scales (and mins, and the search's codes) llama.cpp's search
    finds for ``w [rows, cols]`` (weighted by ``importance`` as in ``quantize``), before any of them is rounded
    to what the file stores (see ``GGUFScales``).  A tuner starts from these; ``quantize_with_scales(w,
    type_name, *search_scales(w, type_name, imp), importance=imp)`` is ``quantize(w, type_name, imp)`` byte for
    byte.  With an importance the legacy types' codes come back too: llama.cpp stores them as they are."""
    t, rows, cols, x = _as_float32(w, type_name)
    imp = _importance(importance, cols, x)
    found = _by_rows(rows, cols, lambda r: search_blocks(t, x[r].reshape(-1, t.block_size), _weights(t, x, r, imp)))
    per_block = (rows, cols // t.block_size, t.n_sub)
    mins = None if found.mins is None else found.mins.reshape(per_block)
    codes = None if found.codes is None else found.codes.reshape(rows, cols)
    return GGUFScales(found.scales.reshape(per_block), mins, codes)


def _on(x: torch.Tensor, name: str, value: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``value`` detached, as ``dtype`` on ``x``'s device, once its shape (and kind: float or uint8) is checked."""
    if tuple(value.shape) != shape or (value.dtype == torch.uint8) != (dtype == torch.uint8):
        kind = "uint8" if dtype == torch.uint8 else "float"
        raise ValueError(f"{name!r} must be {kind} of shape {shape}, got {value.dtype} of shape {tuple(value.shape)}")
    return value.detach().to(x.device, dtype)


def _checked(
    t: GGUFType, x: torch.Tensor, s: GGUFScales, v: torch.Tensor | None, weighted: bool = False
) -> tuple[GGUFScales, torch.Tensor | None]:
    """``quantize_with_scales``' arguments as float32 (codes uint8) on ``x``'s device, checked against ``t``."""
    rows, cols = x.shape
    per_block = (rows, cols // t.block_size, t.n_sub)
    if t.has_min and s.mins is None:
        raise ValueError(f"{t.name} needs mins of shape {per_block}; search_scales gives a starting point")
    if not t.has_min and s.mins is not None:
        with_min = ", ".join(n for n, other in GGUF_TYPES.items() if other.has_min)
        raise ValueError(f"{t.name} has no mins (only {with_min} have); got a tensor for them")
    if s.codes is not None and not t.is_k_quant and not (weighted and t.name != "q8_0"):
        raise ValueError(f"{t.name} computes every code from its scales; pass codes only for K-quants")
    if s.codes is not None and not t.is_k_quant and v is not None:
        raise ValueError(f"{t.name} stores given codes as they are: pass either codes or v, not both")
    f32 = torch.float32
    scales = _on(x, "scales", s.scales, per_block, f32)
    mins = None if s.mins is None else _on(x, "mins", s.mins, per_block, f32)
    codes = None if s.codes is None else _on(x, "codes", s.codes, (rows, cols), torch.uint8)
    if v is not None:
        v = _on(x, "v", v, (rows, cols), f32)
        if bool((v.abs() > 0.5).any()):
            raise ValueError(f"the rounding offset v must lie in [-0.5, 0.5]; got |v| up to {float(v.abs().max())}")
    return GGUFScales(scales, mins, codes), v


@torch.no_grad()
def quantize_with_scales(
    w: torch.Tensor,
    type_name: str,
    scales: torch.Tensor,
    mins: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    *,
    v: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> GGUFQuantized:
    """llama.cpp's second stage for ``w [rows, cols]`` with float ``scales`` / ``mins`` chosen elsewhere (a tuner),
    in ``GGUFScales``' shapes and sign convention, so that the result is exactly what llama.cpp would store for them.

    K-quants: the scales (and mins) are quantized to the type's integer sub-block values against fp16 super-block
    ``d`` (``dmin``) from their largest one, and every code is recomputed as ``nearest_int((w + dmin * mins) /
    (d * scales) + v)``, clamped.  Legacy types: ``d`` (and ``m = -mins``) are stored as fp16, and the codes use the
    float32 ``d``, as ``quantize_row_*_ref`` does.  ``codes``: the search's codes (``GGUFScales.codes``), which
    llama.cpp keeps where a stored step is 0; they only change bytes, not values, so a tuner may leave them None.
    ``v``: a per-weight rounding offset, float ``[rows, cols]`` in ``[-0.5, 0.5]``, added before rounding (None and
    zeros give the same codes).  ``importance``: llama.cpp's importance-matrix path, as in ``quantize``: q2_k ..
    q5_k store their sub-block scales (and mins) by its weighted fit, and the legacy types (q8_0 aside) accept the
    search's ``codes``, stored as they are (llama.cpp does not recompute them; without ``v``).  Raises ValueError
    naming a missing, extra or misshapen argument."""
    t, rows, cols, x = _as_float32(w, type_name)
    imp = _importance(importance, cols, x)
    s, v = _checked(t, x, GGUFScales(scales, mins, codes), v, weighted=imp is not None)
    stage2_imp = imp if t.name in WEIGHTED_STORE else None  # the other types store as without one

    def chunk(r: slice) -> Blocks:
        per_block = (-1, t.n_sub)
        found = BlockScales(
            s.scales[r].reshape(per_block),
            None if s.mins is None else s.mins[r].reshape(per_block),
            None if s.codes is None else s.codes[r].reshape(-1, t.block_size),
        )
        offset = None if v is None else v[r].reshape(-1, t.block_size)
        return store_blocks(t, x[r].reshape(-1, t.block_size), found, offset, _weights(t, x, r, stage2_imp))

    return quantized_of(t, (rows, cols), _by_rows(rows, cols, chunk))


def dequantize(q: GGUFQuantized) -> torch.Tensor:
    """float32 ``[rows, cols]``: what llama.cpp's ``dequantize_row_*`` computes, bit for bit."""
    t = q.type
    rows, cols = q.shape
    codes = q.codes.reshape(rows, cols // t.block_size, t.n_sub, t.sub_block).float()
    d = q.d.float().unsqueeze(-1)
    scale = d * q.scales.float() if t.is_k_quant else d  # exact: an fp16 times a small integer
    w = scale.unsqueeze(-1) * (codes - t.code_offset)
    if q.m is not None:
        w = w + q.m.float()[..., None, None]
    if q.mins is not None:
        w = w - (q.dmin.float().unsqueeze(-1) * q.mins.float()).unsqueeze(-1)
    return w.reshape(rows, cols)
