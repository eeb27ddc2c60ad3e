"""Bit packing of small unsigned integers into int32 words, as a continuous little-endian bit stream.

Why a bit stream: GPTQ-family checkpoints (auto_round, auto_gptq, GPTQModel v1) pack every run of 32
values into ``bits`` int32 words, value ``k`` of the run occupying stream bits ``[k*bits, (k+1)*bits)``
with stream bit ``j`` stored in word ``j // 32`` at bit ``j % 32``.  For 2/4/8 bits no value crosses a
word; for 3 bits values 10 and 21 of each run straddle two words (the reference's "10 + 1 + 10 + 1 + 10"
pattern is exactly this stream).  One rule covers every width, so there is no per-width special case.

Words are returned as ``torch.int32`` (the checkpoint dtype): a word whose top bit is set is negative.
All work is vectorised over every run at once; the only Python loop is over the 32 positions of a run.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["RUN", "pack_int32", "unpack_int32"]

RUN = 32  # values per run; a run fills exactly ``bits`` int32 words
_WORD_MASK = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed; accepted: an integer in 1..8")


def _positions(bits: int):
    """(value index in run, word index, shift, bits spilling into the next word) for each of the 32 values."""
    for k in range(RUN):
        start = k * bits
        word, shift = divmod(start, 32)
        yield k, word, shift, max(0, shift + bits - 32)


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``values`` (< 2**bits) along ``dim`` into int32 words.

    :param values: integer tensor; its size along ``dim`` must be a multiple of 32.
    :param bits: width of every value, 1..8.
    :param dim: the dimension to pack; its size becomes ``size * bits // 32``.
    :return: ``torch.int32`` tensor, same shape as ``values`` except along ``dim``.
    """
    _check_bits(bits)
    if values.is_floating_point() or values.is_complex():
        raise ValueError(f"pack_int32 needs an integer tensor, got dtype {values.dtype}")
    dim = dim % values.dim()
    moved = values.movedim(dim, 0)
    n = moved.shape[0]
    if n % RUN:
        raise ValueError(f"cannot pack {n} values along dim {dim}: the size must be a multiple of {RUN}")
    rest = moved.shape[1:]
    runs = moved.reshape(n // RUN, RUN, *rest)
    words = torch.zeros((n // RUN, bits, *rest), dtype=torch.int64, device=values.device)
    for k, word, shift, spill in _positions(bits):
        v = runs[:, k].to(torch.int64)
        words[:, word] |= v << shift
        if spill:
            words[:, word + 1] |= v >> (bits - spill)
    words &= _WORD_MASK
    signed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return signed.reshape(n // RUN * bits, *rest).movedim(0, dim)


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words along ``dim`` -> ``torch.uint8`` values (``32 / bits`` per word).

    :param words: ``torch.int32`` tensor; its size along ``dim`` must be a multiple of ``bits``.
    """
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise ValueError(f"unpack_int32 needs torch.int32 words, got dtype {words.dtype}")
    dim = dim % words.dim()
    moved = words.movedim(dim, 0)
    n_words = moved.shape[0]
    if n_words % bits:
        raise ValueError(f"cannot unpack {n_words} words along dim {dim} at bits={bits}: not a multiple of {bits}")
    if 32 % bits == 0:
        return _unpack_aligned(words, bits, dim)
    rest = moved.shape[1:]
    runs = moved.reshape(n_words // bits, bits, *rest).to(torch.int64) & _WORD_MASK
    out = torch.empty((n_words // bits, RUN, *rest), dtype=torch.uint8, device=words.device)
    mask = (1 << bits) - 1
    for k, word, shift, spill in _positions(bits):
        v = runs[:, word] >> shift
        if spill:
            v = v | (runs[:, word + 1] << (bits - spill))
        out[:, k] = (v & mask).to(torch.uint8)
    return out.reshape(n_words // bits * RUN, *rest).movedim(0, dim)


def _unpack_aligned(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """:func:`unpack_int32` for widths that never straddle a word (1, 2, 4, 8 bits).

    The torch backend unpacks on every forward, so this reads the words as bytes (little-endian: byte ``b`` of a
    word holds its values ``b * 8 / bits`` onwards) and extracts each byte's values with one shift and mask per
    position, in uint8 throughout: 4x less memory traffic than shifting int32 words, about 5x faster on CPU for
    4-bit codes.  A big-endian host takes the int32 shifts.
    """
    per_word = 32 // bits
    shape = list(words.shape)
    shape[dim] *= per_word
    if sys.byteorder != "little":
        view = [1] * (words.dim() + 1)
        view[dim + 1] = per_word
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(view)
        return ((words.unsqueeze(dim + 1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(shape)
    as_bytes = words.contiguous().view(torch.uint8).view(*words.shape, 4)
    if bits < 8:
        mask = (1 << bits) - 1
        values = torch.stack([(as_bytes >> shift) & mask for shift in range(0, 8, bits)], dim=-1)
        as_bytes = values.view(*words.shape, per_word)
    return as_bytes.movedim(-1, dim + 1).reshape(shape)
