"""GGUF block math (signround.quant.gguf) against gguf-py, llama.cpp's bytes and hand-worked examples.

Oracles: gguf-py (the ``gguf`` extra) quantizes the legacy types and dequantizes every type in numpy; llama.cpp's own
``ggml_quantize_chunk`` is used through ctypes where a ``libggml-base`` is found (``SIGNROUND_GGML_BASE_LIB``, else
llama-cpp-python importable here, else installed in the checkout's ``.venv-llama``), and frozen SHA-256 digests of
its bytes for one deterministic weight pin the K-quant searches everywhere else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from signround.quant import gguf as gq
from signround.quant.gguf import (
    GGUF_TYPES,
    GGUFQuantized,
    GGUFScales,
    dequantize,
    from_bytes,
    quantize,
    quantize_with_scales,
    search_scales,
    to_bytes,
)

LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
K_QUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
ALL = LEGACY + K_QUANTS
CASES = ("gauss", "outliers", "zero_rows", "constant_rows", "tiny", "mixed")


@pytest.fixture(scope="module")
def gguf_py():
    return pytest.importorskip("gguf", reason="gguf-py (the 'gguf' extra) is the reference for bytes and values")


def _qtype(gguf_py, name: str):
    return gguf_py.GGMLQuantizationType[name.upper()]


def _weights(case: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Test weights.  Zeros are +0.0 on purpose: gguf-py's q4_1/q5_1 may store a -0.0 block minimum where llama.cpp
    keeps the first of ``0.0`` / ``-0.0`` (this module follows llama.cpp; see ``test_bytes_match_llama_cpp``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if case == "outliers":
        w = torch.where(torch.rand(shape, generator=g) < 0.02, w * 60, w)
    elif case == "zero_rows":
        w[::2] = 0.0
    elif case == "constant_rows":
        w[0], w[1] = 0.375, -2.5
        w[2] = torch.where(torch.arange(shape[1]) % 2 == 0, 1.5, -1.5)  # +/- ties for the largest magnitude
    elif case == "tiny":
        w = w * 1e-6  # fp16 scales are subnormal
    elif case == "mixed":  # every 16 weights one of: gaussian, zero, constant, one-signed, sparse, tiny, large
        kind = torch.randint(0, 7, (w.numel() // 16, 1), generator=g)
        subs = w.reshape(-1, 16)
        sparse = torch.where(torch.rand(subs.shape, generator=g) < 0.75, 0.0, subs)
        zero, constant = torch.zeros_like(subs), torch.full_like(subs, -0.5)
        options = torch.stack([subs, zero, constant, subs.abs(), sparse, subs * 1e-4, subs * 50])
        w = options[kind.squeeze(1), torch.arange(subs.shape[0])].reshape(shape)
    return w


def _shapes(name: str) -> list[tuple[int, int]]:
    b = GGUF_TYPES[name].block_size
    return [(4, b), (6, 3 * b)] if b == 256 else [(4, 32), (5, 96), (8, 512)]


def _assert_same(a: GGUFQuantized, b: GGUFQuantized) -> None:
    """Field by field, bit for bit (fp16 compared as bits, so -0.0 and NaN payloads count)."""
    assert (a.type_name, a.shape) == (b.type_name, b.shape)
    for field in ("codes", "d", "m", "dmin", "scales", "mins"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, field
            bits = (lambda t: t.view(torch.int16)) if x.dtype == torch.float16 else (lambda t: t)
            assert torch.equal(bits(x), bits(y)), field


# -- the registry ------------------------------------------------------------------------------------------------
def test_registry_matches_gguf_py(gguf_py) -> None:
    assert set(GGUF_TYPES) == set(ALL)
    for name, t in GGUF_TYPES.items():
        qtype = _qtype(gguf_py, name)
        assert t.ggml_type == qtype.value
        assert (t.block_size, t.type_size) == gguf_py.GGML_QUANT_SIZES[qtype]
    assert [GGUF_TYPES[n].bits_per_weight for n in K_QUANTS] == [2.625, 3.4375, 4.5, 5.5, 6.5625]


def test_unknown_type_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'q4_k_m'.*q4_0.*q6_k"):
        quantize(torch.zeros(1, 256), "q4_k_m")
    assert gq.gguf_type("Q4_K") is GGUF_TYPES["q4_k"]


@pytest.mark.parametrize(("name", "cols"), [("q4_k", 100), ("q6_k", 288), ("q4_0", 48), ("q8_0", 0)])
def test_bad_row_length_is_refused(name: str, cols: int) -> None:
    block = GGUF_TYPES[name].block_size
    with pytest.raises(ValueError, match=rf"{name}.*multiple of {block}.*got rows of {cols}"):
        quantize(torch.zeros(2, cols), name)


def test_bad_shapes_and_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.zeros(256), "q4_k")
    with pytest.raises(ValueError, match="need 144 uint8 bytes"):
        from_bytes(np.zeros(143, np.uint8), "q4_k", (1, 256))
    q = quantize(torch.randn(2, 256), "q4_k")
    with pytest.raises(ValueError, match=r"'dmin' must be torch\.float16"):
        GGUFQuantized("q4_k", q.shape, q.codes, q.d, dmin=q.dmin.float(), scales=q.scales, mins=q.mins)
    with pytest.raises(ValueError, match="q4_k has no 'm'"):
        GGUFQuantized("q4_k", q.shape, q.codes, q.d, m=q.d, dmin=q.dmin, scales=q.scales, mins=q.mins)
    q.codes[0, 0] = 16
    with pytest.raises(ValueError, match=r"codes must be in \[0, 15\]"):
        to_bytes(q)
    q3 = quantize(torch.randn(1, 256), "q3_k")
    q3.scales[0, 0, 0] = 40
    with pytest.raises(ValueError, match=r"scales must be in \[-32, 31\]"):
        to_bytes(q3)


# -- hand-worked examples ----------------------------------------------------------------------------------------
def test_q4_0_hand_example() -> None:
    """The signed largest magnitude maps to code 0: -8 gives d = -8 / -8 = 1 and codes trunc(x + 8.5), so 2.5
    rounds half up to 11 and 7.5 clips at 15; +8 instead gives d = -1 and codes trunc(-x + 8.5)."""
    x = torch.zeros(2, 32)
    x[0, :5] = torch.tensor([-8.0, -4.0, 2.5, 7.5, 0.25])
    x[1, :3] = torch.tensor([8.0, -1.0, 0.5])
    q = quantize(x, "q4_0")
    assert q.d.float().tolist() == [[1.0], [-1.0]]
    assert q.codes[0, :5].tolist() == [0, 4, 11, 15, 8] and q.codes[1, :3].tolist() == [0, 9, 8]
    assert dequantize(q)[0, :5].tolist() == [-8.0, -4.0, 3.0, 7.0, 0.0]
    assert dequantize(q)[1, :3].tolist() == [8.0, -1.0, 0.0]


def test_q8_0_rounds_halves_away_from_zero() -> None:
    """d = amax / 127 = 1 for a block holding 127; roundf sends +-0.5 and +-2.5 away from zero (torch.round would
    give 0 and 2); codes are stored + 128."""
    x = torch.zeros(1, 32)
    x[0, :5] = torch.tensor([127.0, 0.5, -0.5, 2.5, -2.5])
    q = quantize(x, "q8_0")
    assert q.d.float().item() == 1.0
    assert (q.codes[0, :5].int() - 128).tolist() == [127, 1, -1, 3, -3]
    assert to_bytes(q)[0, 2:7].view(np.int8).tolist() == [127, 1, -1, 3, -3]


# -- against gguf-py ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_match_gguf_py(gguf_py, name: str, case: str) -> None:
    for seed, shape in enumerate(_shapes(name)):
        w = _weights(case, shape, seed)
        ours = to_bytes(quantize(w, name))
        assert ours.dtype == np.uint8 and ours.shape == (shape[0], shape[1] // 32 * GGUF_TYPES[name].type_size)
        np.testing.assert_array_equal(ours, gguf_py.quants.quantize(w.numpy(), _qtype(gguf_py, name)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ALL)
def test_dequantize_matches_gguf_py(gguf_py, name: str, case: str) -> None:
    for seed, shape in enumerate(_shapes(name)):
        q = quantize(_weights(case, shape, seed), name)
        reference = torch.from_numpy(gguf_py.quants.dequantize(to_bytes(q), _qtype(gguf_py, name)))
        ours = dequantize(q)
        assert ours.dtype == torch.float32 and ours.shape == reference.shape == shape
        assert torch.equal(ours, reference)


def _random_quantized(name: str, rows: int, blocks: int, seed: int) -> GGUFQuantized:
    """Every field filled over its whole range (values ``quantize`` rarely or never produces, e.g. q3_k's -32)."""
    t = GGUF_TYPES[name]
    g = torch.Generator().manual_seed(seed)

    def half() -> torch.Tensor:  # finite fp16 scales of either sign
        return (torch.randn(rows, blocks, generator=g) * 0.01).half()

    sub = (rows, blocks, t.n_sub)
    lo, hi = t.scale_range
    fields = {
        "codes": torch.randint(0, t.max_code + 1, (rows, blocks * t.block_size), generator=g).to(torch.uint8),
        "d": half(),
        "m": half() if t.has_min and not t.is_k_quant else None,
        "dmin": half() if t.has_min and t.is_k_quant else None,
        "scales": torch.randint(lo, hi + 1, sub, generator=g).to(t.scale_dtype) if t.is_k_quant else None,
        "mins": torch.randint(0, hi + 1, sub, generator=g).to(torch.uint8) if t.has_min and t.is_k_quant else None,
    }
    return GGUFQuantized(name, (rows, blocks * t.block_size), **fields)


@pytest.mark.parametrize("name", ALL)
def test_dequantize_matches_gguf_py_on_any_stored_values(gguf_py, name: str) -> None:
    q = _random_quantized(name, 5, 3, seed=1)
    reference = torch.from_numpy(gguf_py.quants.dequantize(to_bytes(q), _qtype(gguf_py, name)))
    assert torch.equal(dequantize(q), reference)


# -- layout round trips ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_bytes_round_trip(name: str) -> None:
    """from_bytes inverts to_bytes both ways: on quantized weights, on random fields, and on random bytes (every
    bit of every block struct is a field, so any byte string is a valid block)."""
    for case in ("gauss", "mixed", "zero_rows"):
        q = quantize(_weights(case, _shapes(name)[-1]), name)
        _assert_same(from_bytes(to_bytes(q), name, q.shape), q)
    q = _random_quantized(name, 3, 2, seed=2)
    _assert_same(from_bytes(to_bytes(q), name, q.shape), q)
    t = GGUF_TYPES[name]
    raw = np.random.default_rng(3).integers(0, 256, (3, 2 * t.type_size), dtype=np.uint8)
    np.testing.assert_array_equal(to_bytes(from_bytes(raw, name, (3, 2 * t.block_size))), raw)


@pytest.mark.parametrize("name", ALL)
def test_row_chunks_do_not_change_the_result(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights("mixed", (7, 512))
    whole = quantize(w, name)
    found = search_scales(w, name)
    monkeypatch.setattr(gq, "CHUNK_ELEMENTS", 600)  # one row per slice
    _assert_same(quantize(w, name), whole)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(search_scales(w, name), found, strict=True))
    _assert_same(quantize_with_scales(w, name, *found), whole)


# -- the two stages, for a tuner ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_search_scales_shapes(name: str) -> None:
    t = GGUF_TYPES[name]
    found = search_scales(_weights("gauss", (3, 2 * t.block_size)), name)
    assert isinstance(found, GGUFScales)
    assert found.scales.dtype == torch.float32 and found.scales.shape == (3, 2, t.n_sub)
    assert (found.mins is not None) == t.has_min
    if t.has_min:
        assert found.mins.dtype == torch.float32 and found.mins.shape == (3, 2, t.n_sub)
    assert (found.codes is not None) == t.is_k_quant
    if t.is_k_quant:
        assert found.codes.dtype == torch.uint8 and found.codes.shape == (3, 2 * t.block_size)


@pytest.mark.parametrize("name", ALL)
def test_quantize_is_search_then_store(name: str) -> None:
    """The two public stages compose to ``quantize`` byte for byte, on every kind of weight (the overflow case
    sends inf and NaN through both stages)."""
    for seed, case in enumerate((*CASES, "overflow")):
        w = _weights("mixed" if case == "overflow" else case, (6, 512), seed) * (3e4 if case == "overflow" else 1)
        whole = quantize(w, name)
        staged = quantize_with_scales(w, name, *search_scales(w, name))
        _assert_same(staged, whole)
        np.testing.assert_array_equal(to_bytes(staged), to_bytes(whole))


@pytest.mark.parametrize("name", K_QUANTS)
def test_search_codes_change_bytes_not_values(name: str) -> None:
    """Where a stored step ``d * scales`` is 0, llama.cpp keeps the search's codes: without them the bytes differ
    there (so ``codes`` is needed to match llama.cpp) but no dequantized value does (so a tuner can drop them)."""
    w = _weights("mixed", (6, 512), seed=5)
    found = search_scales(w, name)
    without = quantize_with_scales(w, name, found.scales, found.mins)
    reference = quantize(w, name)
    assert not torch.equal(without.codes, reference.codes)
    assert torch.equal(dequantize(without), dequantize(reference))
    t = GGUF_TYPES[name]
    step = (without.d.float().unsqueeze(-1) * without.scales.float()).repeat_interleave(t.sub_block, -1)
    assert torch.all(without.codes[step.reshape(w.shape) == 0] == t.code_offset)


@pytest.mark.parametrize("name", ALL)
def test_zero_offset_is_the_identity(name: str) -> None:
    w = _weights("mixed", (4, 512), seed=6)
    found = search_scales(w, name)
    zero = torch.zeros_like(w)
    _assert_same(quantize_with_scales(w, name, *found, v=zero), quantize_with_scales(w, name, *found))
    _assert_same(quantize_with_scales(w, name, *found, v=-zero), quantize(w, name))


@pytest.mark.parametrize("name", ALL)
def test_offset_shifts_codes(name: str) -> None:
    """Rounding is monotone in ``v``: a positive offset never lowers a code, a negative one never raises it, and
    both move many; the stored scales do not depend on ``v``."""
    w = _weights("gauss", (4, 512), seed=7)
    found = search_scales(w, name)
    base = quantize_with_scales(w, name, *found)
    up = quantize_with_scales(w, name, *found, v=torch.full_like(w, 0.49))
    down = quantize_with_scales(w, name, *found, v=torch.full_like(w, -0.49))
    assert torch.all(up.codes >= base.codes) and torch.all(down.codes <= base.codes)
    assert (up.codes > base.codes).float().mean() > 0.2 and (down.codes < base.codes).float().mean() > 0.2
    for q in (up, down):
        _assert_same(dataclasses.replace(q, codes=base.codes), base)


def test_q8_0_offset_hand_example() -> None:
    """d = 1 for a block holding 127; the code is roundf(x + v): 0.3 + 0.3 -> 1, -0.3 - 0.3 -> -1, 2.0 - 0.5 -> 2
    (a half, away from zero), 2.0 + 0.5 -> 3, and 127 + 0.5 clips at 127."""
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([127.0, 0.3, -0.3, 2.0, 2.0, -1.0])
    v = torch.zeros(1, 32)
    v[0, :6] = torch.tensor([0.5, 0.3, -0.3, -0.5, 0.5, 0.0])
    q = quantize_with_scales(x, "q8_0", *search_scales(x, "q8_0"), v=v)
    assert q.d.float().item() == 1.0
    assert (q.codes[0, :6].int() - 128).tolist() == [127, 1, -1, 2, 3, -1]


@pytest.mark.parametrize("name", K_QUANTS)
def test_tuned_scales_are_stored_then_every_code_recomputed(name: str) -> None:
    """Arbitrary float scales / mins (the search's, perturbed) and offsets: every code with a nonzero step is
    ``clamp(round((w + dmin * mins) / (d * scales) + v))`` of the *stored* values, and q4_k's integer scales are
    ``round(scales * 63 / max(scales))`` against ``d = fp16(max / 63)``, as llama.cpp's second stage does."""
    t = GGUF_TYPES[name]
    w = _weights("outliers", (4, 512), seed=8)
    g = torch.Generator().manual_seed(8)
    found = search_scales(w, name)
    scales = found.scales * (1 + 0.2 * torch.rand(found.scales.shape, generator=g))
    mins = None if found.mins is None else found.mins * (1 + 0.2 * torch.rand(found.mins.shape, generator=g))
    v = torch.rand(w.shape, generator=g) - 0.5
    q = quantize_with_scales(w, name, scales, mins, v=v)

    def per_weight(a: torch.Tensor) -> torch.Tensor:  # [rows, n_blocks, n_sub] -> [rows, cols]
        return a.repeat_interleave(t.sub_block, -1).reshape(w.shape)

    step = per_weight(q.d.float().unsqueeze(-1) * q.scales.float())
    shift = per_weight(q.dmin.float().unsqueeze(-1) * q.mins.float()) if q.mins is not None else 0.0
    lo = -t.code_offset
    expected = torch.round((w + shift) / step + v).clamp(lo, t.max_code + lo) - lo
    live = step != 0
    assert live.float().mean() > 0.5  # q2_k's 4-bit scales round the sub-blocks next to an outlier to 0
    assert torch.equal(q.codes[live].float(), expected[live])
    if name == "q4_k":
        top = scales.amax(-1)
        assert torch.equal(q.d, (top / 63).half())
        assert torch.equal(
            q.scales, torch.round(torch.div(torch.tensor(63.0), top).unsqueeze(-1) * scales).to(torch.uint8)
        )


def test_quantize_with_scales_refuses_bad_arguments() -> None:
    w = torch.randn(2, 256)
    k4, k6, q40 = search_scales(w, "q4_k"), search_scales(w, "q6_k"), search_scales(w, "q4_0")
    with pytest.raises(ValueError, match=r"q4_k needs mins of shape \(2, 1, 8\)"):
        quantize_with_scales(w, "q4_k", k4.scales)
    with pytest.raises(ValueError, match="q6_k has no mins"):
        quantize_with_scales(w, "q6_k", k6.scales, k4.scales.repeat_interleave(2, -1))
    with pytest.raises(ValueError, match="q4_0 computes every code from its scales"):
        quantize_with_scales(w, "q4_0", q40.scales, codes=k4.codes)
    with pytest.raises(ValueError, match=r"'scales' must be float of shape \(2, 1, 16\)"):
        quantize_with_scales(w, "q6_k", k4.scales)
    with pytest.raises(ValueError, match=r"'codes' must be uint8"):
        quantize_with_scales(w, "q6_k", k6.scales, codes=k6.codes.float())
    with pytest.raises(ValueError, match=r"v must lie in \[-0.5, 0.5\]; got \|v\| up to 0.75"):
        quantize_with_scales(w, "q6_k", *k6, v=torch.full_like(w, -0.75))


# -- accuracy ----------------------------------------------------------------------------------------------------
# Relative RMSE on Gaussian weights [32, 512] (seed 0): measured values 0.0054 / 0.0177 / 0.0361 / 0.0717 / 0.151 /
# 0.301 (q8_0 ... q2_k).  The upper bounds sit below what the K-quants give without their search (q6_k 0.0187,
# q5_k 0.0382, q4_k 0.0788, q2_k 0.330), so a broken search fails here, not only in the byte comparisons.
ERROR_BANDS = {
    "q8_0": (0.004, 0.0065),
    "q6_k": (0.0165, 0.0184),
    "q5_k": (0.034, 0.0374),
    "q4_k": (0.067, 0.0745),
    "q3_k": (0.142, 0.158),
    "q2_k": (0.285, 0.315),
    "q5_1": (0.035, 0.040),
    "q5_0": (0.040, 0.045),
    "q4_1": (0.074, 0.082),
    "q4_0": (0.081, 0.090),
}


def test_error_bands_and_ordering() -> None:
    w = torch.from_numpy(np.random.RandomState(0).standard_normal((32, 512)).astype(np.float32))
    errors = {name: float((dequantize(quantize(w, name)) - w).norm() / w.norm()) for name in ERROR_BANDS}
    for name, (lo, hi) in ERROR_BANDS.items():
        assert lo < errors[name] < hi, (name, errors[name])
    k_order = [errors[n] for n in ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k")]
    assert k_order == sorted(k_order)
    legacy_order = [errors[n] for n in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")]
    assert legacy_order == sorted(legacy_order)
    assert errors["q4_k"] < errors["q4_1"] and errors["q5_k"] < errors["q5_1"]


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_codes_are_nearest_for_the_stored_scales(name: str) -> None:
    """The last step of every ``*_K_ref`` recomputes the codes from the stored (integer, fp16) scales: each code
    not at an end of the range is the nearest one, |x - dequantized| <= |step| / 2 (sub-blocks whose step is 0
    keep the search's codes, which dequantize to the same value whatever they are)."""
    t = GGUF_TYPES[name]
    w = _weights("outliers", (8, 512), seed=4)
    q = quantize(w, name)
    step = (q.d.float().unsqueeze(-1) * q.scales.float()).repeat_interleave(t.sub_block, dim=-1).reshape(w.shape)
    inside = (q.codes > 0) & (q.codes < t.max_code) & (step != 0)
    assert inside.float().mean() > 0.15  # not vacuous (q2_k has two inner codes of four)
    gap = (w - dequantize(q)).abs()
    assert torch.all(gap[inside] <= step.abs()[inside] * (0.5 + 1e-4) + 1e-6)


@pytest.mark.parametrize("name", ALL)
def test_zero_rows_dequantize_to_zero(name: str) -> None:
    w = _weights("zero_rows", (4, GGUF_TYPES[name].block_size * 2))
    dq = dequantize(quantize(w, name))
    assert torch.equal(dq[::2], torch.zeros_like(dq[::2]))


# -- against llama.cpp -------------------------------------------------------------------------------------------
def _golden_weights() -> np.ndarray:
    """A deterministic [8, 512] weight of dyadic values (exact on every platform; RandomState's stream is frozen):
    near-Gaussian sums of uniform integers, plus zero, constant, one-signed, sparse and outlier sub-blocks."""
    rng = np.random.RandomState(1234)
    w = rng.randint(-2048, 2049, size=(8, 512, 4)).sum(-1).astype(np.float32) / 2048
    subs = w.reshape(-1, 16)
    subs[::7] = 0.0
    subs[1::7] = 0.625
    subs[2::7] = np.abs(subs[2::7])
    subs[3::7] *= rng.randint(0, 2, size=subs[3::7].shape)
    subs[4::7] *= 64.0
    subs[5::7] /= 1024.0
    return w


# SHA-256 of llama.cpp's bytes for _golden_weights(), from ggml_quantize_chunk (no imatrix, i.e. the *_ref
# functions) of llama-cpp-python 0.3.36's libggml-base (x86-64, no FMA).  A change here means the search no longer
# follows llama.cpp: compare with test_bytes_match_llama_cpp where a libggml-base is available.
GOLDEN_SHA256 = {
    "q4_0": "98ff08ddad1fe5a922df3c0fdb255b6dace25936b1dcf8272746229c6188d009",
    "q4_1": "4f00c234f0757be1f52dafcf1f0f4e6a2b99ce4ff2532a2c11b3c13285280646",
    "q5_0": "ad133bd7ea36e05e2aa57a8d5da86ffd1a8f65250de940feb0c893ecab04f287",
    "q5_1": "29400a21a53ab53a9bfae02de42f28785858202db73105e222599256fe97ead3",
    "q8_0": "1f9456abd0a5ed17ce4f4a91cc6d9b44d4cf740e5e082368b36f9b32d029d110",
    "q2_k": "477ecda4016a7d35fbefdc979190336f5bb26f7f9381a9dfc173cde7a82f6ddf",
    "q3_k": "b31e1b743992a1e63831789ae2f0c66b6a3fe28063fb3a37112a6b7356960d8d",
    "q4_k": "11d0f7b33e68426ed45bb67eede9de9f859156c5510d9a200f8421473bc79208",
    "q5_k": "816f5fb511f5c0a5fbda2c43e34085b9a91f0e04e03de5e486528eb9e1eb56e9",
    "q6_k": "b6e4b09794ab23a2eb7d635125693ffd5484e541b95791714b69bb345222935b",
}


@pytest.mark.parametrize("name", ALL)
def test_bytes_match_llama_cpp_digest(name: str) -> None:
    data = to_bytes(quantize(torch.from_numpy(_golden_weights()), name))
    assert hashlib.sha256(data.tobytes()).hexdigest() == GOLDEN_SHA256[name]


_REPO = Path(__file__).resolve().parents[1]


def _ggml_base_path() -> str | None:
    """``SIGNROUND_GGML_BASE_LIB``, else the libggml-base of a llama-cpp-python importable here, else of one
    installed in this checkout's ``.venv-llama`` (kept apart from ``.venv``: it pins its own numpy)."""
    path = os.environ.get("SIGNROUND_GGML_BASE_LIB")
    if path:
        return path
    spec = importlib.util.find_spec("llama_cpp")
    found = [] if spec is None or not spec.origin else sorted(Path(spec.origin).parent.glob("lib/libggml-base.*"))
    found += sorted(_REPO.glob(".venv-llama/lib/python*/site-packages/llama_cpp/lib/libggml-base.*"))
    return str(found[0]) if found else None


@pytest.fixture(scope="module")
def ggml_base() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("llama.cpp built where C compilers contract a*b+c into FMAs (e.g. aarch64) rounds differently")
    path = _ggml_base_path()
    if path is None:
        pytest.skip(
            "no libggml-base found: set SIGNROUND_GGML_BASE_LIB to one, or install llama-cpp-python here or in "
            f"{_REPO / '.venv-llama'}"
        )
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:  # a library named explicitly but unusable is an error, not a reason to skip
        pytest.fail(f"cannot load libggml-base {path}: {e}")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    return lib


def _llama_cpp_bytes(lib: ctypes.CDLL, w: np.ndarray, name: str) -> np.ndarray:
    t = GGUF_TYPES[name]
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((w.shape[0], w.shape[1] // t.block_size * t.type_size), np.uint8)
    written = lib.ggml_quantize_chunk(t.ggml_type, w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
    assert written == out.size
    return out


@pytest.mark.parametrize("name", ALL)
def test_bytes_match_llama_cpp(ggml_base: ctypes.CDLL, name: str) -> None:
    """llama.cpp's quantizer itself, including what gguf-py does not do (K-quants, a -0.0 block minimum)."""
    golden = _golden_weights()
    reference = _llama_cpp_bytes(ggml_base, golden, name)
    assert hashlib.sha256(reference.tobytes()).hexdigest() == GOLDEN_SHA256[name]  # the digests' source
    np.testing.assert_array_equal(to_bytes(quantize(torch.from_numpy(golden), name)), reference)
    staged = quantize_with_scales(torch.from_numpy(golden), name, *search_scales(torch.from_numpy(golden), name))
    np.testing.assert_array_equal(to_bytes(staged), reference)
    for seed, case in enumerate((*CASES, "signed_zeros", "overflow")):
        w = _weights(case, (6, 512), seed)
        if case == "signed_zeros":
            w = w * torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) < 0.2, -0.0, 1.0)
        elif case == "overflow":  # scales beyond fp16: inf d / dmin, codes from C's nearest_int of inf and NaN
            w = _weights("mixed", (6, 512), seed) * 3e4
        np.testing.assert_array_equal(to_bytes(quantize(w, name)), _llama_cpp_bytes(ggml_base, w.numpy(), name))
