"""GGUF block structs: the on-disk bytes of llama.cpp's legacy and K-quant blocks, written and read back.

Bytes are the block structs of ``ggml-common.h``, little-endian, ``[rows, cols // block_size * type_size]`` uint8,
each struct's fields in ``GGUFType.layout`` order.  The fp16 fields (``d``, ``m``, ``dmin``) are encoded alike for
every type; each type has one encoder and one decoder, side by side, for the rest (codes, integer scales and mins),
built from a few bit-packing helpers.  Nothing is rounded here: ``to_bytes`` writes ``GGUFQuantized``'s values
unchanged (refusing values that would not fit their bit fields) and ``from_bytes`` inverts it exactly, so any byte
string of the right length reads back to itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .gguf_types import Blocks, GGUFQuantized, GGUFType, blocks_of, check_shape, gguf_type, quantized_of

__all__ = ["from_bytes", "to_bytes"]

# ----------------------------------------------------------------------------------------------------------------
# bit packing


def _pack(v: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., k, m]`` -> ``[..., m]``: ``v[..., i, :] << (bits * i)`` OR-ed over ``i``."""
    out = v[..., 0, :].clone()
    for i in range(1, v.shape[-2]):
        out |= v[..., i, :] << (bits * i)
    return out


def _unpack(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``_pack``: uint8 ``[..., m]`` -> ``[..., k, m]``."""
    return torch.stack([(b >> (bits * i)) & (2**bits - 1) for i in range(k)], dim=-2)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.contiguous().view(torch.uint8).view(-1, 2)


def _f16_of(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1)


def _nibbles(c: torch.Tensor) -> torch.Tensor:
    """Legacy ``qs``: byte ``j`` holds weight ``j`` (low nibble) and ``j + 16`` (high)."""
    return _pack((c & 0xF).view(-1, 2, 16), 4)


def _high_bits32(c: torch.Tensor) -> torch.Tensor:
    """q5 ``qh``: bit ``j`` of a little-endian uint32 is the 5th bit of weight ``j``."""
    return _pack((c >> 4).view(-1, 4, 8).transpose(1, 2), 1)


def _crumbs(v: torch.Tensor) -> torch.Tensor:
    """2-bit values of a super-block: in each half of 128, byte ``l`` holds weights ``l, l+32, l+64, l+96``."""
    return _pack(v.view(-1, 2, 4, 32), 2).reshape(-1, 64)


def _uncrumbs(b: torch.Tensor) -> torch.Tensor:
    return _unpack(b.view(-1, 2, 32), 2, 4).reshape(-1, 256)


def _bitplanes(v: torch.Tensor) -> torch.Tensor:
    """One bit per weight of a super-block: bit ``k`` of byte ``l`` is weight ``32 k + l``."""
    return _pack(v.view(-1, 8, 32), 1)


def _k_nibbles(c: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k ``qs``: per 64 weights, byte ``l`` holds weight ``l`` (low nibble) and ``l + 32`` (high)."""
    return _pack((c & 0xF).view(-1, 4, 2, 32), 4).reshape(-1, 128)


def _k_unnibbles(b: torch.Tensor) -> torch.Tensor:
    return _unpack(b.view(-1, 4, 32), 4, 2).reshape(-1, 256)


def _k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """q4_k / q5_k 12-byte scales (``get_scale_min_k4``'s inverse): 6-bit scales 0-3 and mins 0-3 in bytes 0-7,
    the low nibbles of 4-7 in bytes 8-11, their top 2 bits in the top bits of bytes 0-7."""
    return torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                      (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)], dim=1)  # fmt: skip


def _k4_unscales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi, mixed = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([lo & 63, (mixed & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([hi & 63, (mixed >> 4) | ((hi >> 6) << 4)], dim=1)
    return sc, mn


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """q3_k 12-byte scales: 6-bit ``s + 32``; low nibbles of 0-7 / 8-15 in bytes 0-7, top 2 bits in bytes 8-11."""
    u = (s.to(torch.int16) + 32).to(torch.uint8)
    return torch.cat([_pack((u & 0xF).view(-1, 2, 8), 4), _pack((u >> 4).view(-1, 4, 4), 2)], dim=1)


def _q3_unscales(b: torch.Tensor) -> torch.Tensor:
    u = _unpack(b[:, :8], 4, 2).reshape(-1, 16) | (_unpack(b[:, 8:], 2, 4).reshape(-1, 16) << 4)
    return (u.to(torch.int16) - 32).to(torch.int8)


def _q6_low(c: torch.Tensor) -> torch.Tensor:
    """q6_k ``ql``: per 128 weights, byte ``l`` / ``l + 32`` holds weights ``l`` / ``l + 32`` (low nibble) and
    ``l + 64`` / ``l + 96`` (high nibble)."""
    return _pack((c & 0xF).view(-1, 2, 2, 64), 4).reshape(-1, 128)


# ----------------------------------------------------------------------------------------------------------------
# one encoder and one decoder per block struct


class _Parts(NamedTuple):
    """What a block struct holds besides its fp16 fields (``d``, ``m``, ``dmin``, encoded alike for all types)."""

    codes: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None


def _encode_legacy(t: GGUFType, b: Blocks) -> dict[str, torch.Tensor]:
    if t.bits == 8:
        return {"qs": b.codes ^ 0x80}  # code - 128 as an int8 byte
    fields = {"qs": _nibbles(b.codes)}
    if t.bits == 5:
        fields["qh"] = _high_bits32(b.codes)
    return fields


def _decode_legacy(t: GGUFType, f: dict[str, torch.Tensor]) -> _Parts:
    if t.bits == 8:
        return _Parts(f["qs"] ^ 0x80)
    codes = _unpack(f["qs"], 4, 2).reshape(-1, 32)
    if t.bits == 5:
        codes |= _unpack(f["qh"], 1, 8).transpose(1, 2).reshape(-1, 32) << 4
    return _Parts(codes)


def _encode_q2_k(t: GGUFType, b: Blocks) -> dict[str, torch.Tensor]:
    return {"scales": b.scales | (b.mins << 4), "qs": _crumbs(b.codes)}


def _decode_q2_k(t: GGUFType, f: dict[str, torch.Tensor]) -> _Parts:
    return _Parts(_uncrumbs(f["qs"]), f["scales"] & 0xF, f["scales"] >> 4)


def _encode_q3_k(t: GGUFType, b: Blocks) -> dict[str, torch.Tensor]:
    return {"hmask": _bitplanes(b.codes >> 2), "qs": _crumbs(b.codes & 3), "scales": _q3_scales(b.scales)}


def _decode_q3_k(t: GGUFType, f: dict[str, torch.Tensor]) -> _Parts:
    codes = _uncrumbs(f["qs"]) | (_unpack(f["hmask"], 1, 8).reshape(-1, 256) << 2)
    return _Parts(codes, _q3_unscales(f["scales"]))


def _encode_q45_k(t: GGUFType, b: Blocks) -> dict[str, torch.Tensor]:
    fields = {"scales": _k4_scales(b.scales, b.mins), "qs": _k_nibbles(b.codes)}
    if t.bits == 5:
        fields["qh"] = _bitplanes(b.codes >> 4)
    return fields


def _decode_q45_k(t: GGUFType, f: dict[str, torch.Tensor]) -> _Parts:
    codes = _k_unnibbles(f["qs"])
    if t.bits == 5:
        codes |= _unpack(f["qh"], 1, 8).reshape(-1, 256) << 4
    return _Parts(codes, *_k4_unscales(f["scales"]))


def _encode_q6_k(t: GGUFType, b: Blocks) -> dict[str, torch.Tensor]:
    return {"ql": _q6_low(b.codes), "qh": _crumbs(b.codes >> 4), "scales": b.scales.view(torch.uint8)}


def _decode_q6_k(t: GGUFType, f: dict[str, torch.Tensor]) -> _Parts:
    low = _unpack(f["ql"].view(-1, 2, 64), 4, 2).reshape(-1, 256)
    return _Parts(low | (_uncrumbs(f["qh"]) << 4), f["scales"].view(torch.int8))


_Encoder = Callable[[GGUFType, Blocks], dict[str, torch.Tensor]]
_Decoder = Callable[[GGUFType, dict[str, torch.Tensor]], _Parts]
_CODECS: dict[str, tuple[_Encoder, _Decoder]] = {
    **dict.fromkeys(("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"), (_encode_legacy, _decode_legacy)),
    "q2_k": (_encode_q2_k, _decode_q2_k),
    "q3_k": (_encode_q3_k, _decode_q3_k),
    "q4_k": (_encode_q45_k, _decode_q45_k),
    "q5_k": (_encode_q45_k, _decode_q45_k),
    "q6_k": (_encode_q6_k, _decode_q6_k),
}
_HALF_FIELDS = ("d", "m", "dmin")


# ----------------------------------------------------------------------------------------------------------------
# whole tensors


def _check_ranges(q: GGUFQuantized) -> None:
    """Values that do not fit their bit fields would be silently cut by the packing: refuse them."""
    t = q.type
    if q.codes.numel() and int(q.codes.max()) > t.max_code:
        raise ValueError(f"{t.name}: codes must be in [0, {t.max_code}], got up to {int(q.codes.max())}")
    lo, hi = t.scale_range
    for name in ("scales", "mins"):
        v = getattr(q, name)
        if v is not None and v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
            raise ValueError(f"{t.name}: {name} must be in [{lo}, {hi}], got [{int(v.min())}, {int(v.max())}]")


def to_bytes(q: GGUFQuantized) -> np.ndarray:
    """The tensor's data as stored in a GGUF file: uint8 ``[rows, cols // block_size * type_size]``."""
    _check_ranges(q)
    t = q.type
    b = blocks_of(q)
    fields = {name: _f16_bytes(getattr(b, name)) for name in _HALF_FIELDS if getattr(b, name) is not None}
    fields.update(_CODECS[t.name][0](t, b))
    data = torch.cat([fields[name] for name, _ in t.layout], dim=1)
    return data.cpu().numpy().reshape(q.shape[0], q.shape[1] // t.block_size * t.type_size)


def from_bytes(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> GGUFQuantized:
    """Inverse of ``to_bytes``: ``data`` (uint8, ``rows * cols // block_size * type_size`` bytes in any shape) of a
    ``shape`` weight in ``type_name``."""
    t = gguf_type(type_name)
    rows, cols = check_shape(tuple(shape), t)
    expected = rows * cols // t.block_size * t.type_size
    if data.dtype != np.uint8 or data.size != expected:
        raise ValueError(f"{t.name} {shape}: need {expected} uint8 bytes, got {data.size} of {data.dtype}")
    raw = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, t.type_size))
    fields, start = {}, 0
    for name, size in t.layout:
        fields[name] = raw[:, start : start + size].clone()
        start += size
    halves = {name: _f16_of(fields[name]) for name in _HALF_FIELDS if name in fields}
    parts = _CODECS[t.name][1](t, fields)
    return quantized_of(t, (rows, cols), Blocks(parts.codes, scales=parts.scales, mins=parts.mins, **halves))
