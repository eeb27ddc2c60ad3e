"""llama.cpp's importance-matrix path (``quant_weights != NULL``) in signround.quant.gguf, byte for byte.

The oracle is llama.cpp's own ``ggml_quantize_chunk`` given a float imatrix row (what ``llama-quantize --imatrix``
passes: per input column, the mean ``x^2`` of the calibration activations), loaded as in test_quant_gguf.py; the
same helpers skip with a reason where no libggml-base is found.  Then the tunable start (``search_range`` /
``to_gguf`` with the importance) against the same bytes.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from test_quant_gguf import _assert_same, _weights, ggml_base  # noqa: F401  (ggml_base: the fixture)

from signround.quant.gguf import (
    GGUF_TYPES,
    dequantize,
    quantize,
    quantize_with_scales,
    search_scales,
    to_bytes,
)
from signround.quant.gguf_tunable import gguf_fake_quant, search_range, stage2_weights, to_gguf

ALL = tuple(GGUF_TYPES)


def _importance(cols: int, seed: int, zeros: bool = False) -> torch.Tensor:
    """A positive importance row spread over decades, like activation energies (a few columns dominate); with
    ``zeros``: a quarter of the columns and one whole 256-column stretch are 0 (inputs nothing reached)."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.exp(2.0 * torch.randn(cols, generator=g))
    if zeros:
        imp = torch.where(torch.rand(cols, generator=g) < 0.25, 0.0, imp)
        imp[:256] = 0.0
    return imp


def _llama_cpp_bytes(lib: ctypes.CDLL, w: torch.Tensor, name: str, importance: torch.Tensor) -> np.ndarray:
    t = GGUF_TYPES[name]
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    qw = np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // t.block_size * t.type_size), np.uint8)
    written = lib.ggml_quantize_chunk(
        t.ggml_type, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], qw.ctypes.data
    )
    assert written == out.size
    return out


def _weighted_error(w: torch.Tensor, q, importance: torch.Tensor) -> float:
    """``sum_j imp_j (w - q)^2``: the output error the importance stands for."""
    return float((importance * (w - dequantize(q)) ** 2).sum())


SHAPES = ((4, 512), (3, 768), (2, 2048))
WEIGHT_CASES = ("gauss", "outliers", "mixed", "zero_rows")


@pytest.mark.parametrize("name", ALL)
def test_bytes_match_llama_cpp_with_an_imatrix(ggml_base: ctypes.CDLL, name: str) -> None:  # noqa: F811
    """Every type, a few shapes and weight kinds, a positive importance and one with zeros (whole sub-blocks and
    super-blocks of zero weight included): our bytes are llama.cpp's, and search-then-store gives them too."""
    for seed, (shape, case) in enumerate(zip(SHAPES * 2, WEIGHT_CASES * 2, strict=False)):
        w = _weights(case, shape, seed)
        for zeros in (False, True):
            imp = _importance(shape[1], seed, zeros)
            ours = quantize(w, name, imp)
            reference = _llama_cpp_bytes(ggml_base, w, name, imp)
            np.testing.assert_array_equal(to_bytes(ours), reference, err_msg=f"{name} {shape} {case} {zeros}")
            staged = quantize_with_scales(w, name, *search_scales(w, name, imp), importance=imp)
            _assert_same(staged, ours)


@pytest.mark.parametrize("name", ALL)
def test_the_importance_changes_the_result_except_for_q8_0(name: str) -> None:
    w = _weights("gauss", (4, 512), 3)
    imp = _importance(512, 3)
    same = np.array_equal(to_bytes(quantize(w, name, imp)), to_bytes(quantize(w, name)))
    assert same == (name == "q8_0")


@pytest.mark.parametrize("name", [n for n in ALL if n != "q8_0"])
def test_the_weighted_search_lowers_the_importance_weighted_error(name: str) -> None:
    """What the importance is for: ``sum_j imp_j (w - q)^2`` below the unweighted quantizer's."""
    w = _weights("gauss", (16, 512), 5)
    imp = _importance(512, 5)

    assert _weighted_error(w, quantize(w, name, imp), imp) < _weighted_error(w, quantize(w, name), imp)


def test_bad_importance_is_refused() -> None:
    w = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"importance must be float of shape \(256,\)"):
        quantize(w, "q4_k", torch.ones(128))
    with pytest.raises(ValueError, match="q8_0 computes every code"):
        q = search_scales(w, "q4_0", torch.ones(256))
        quantize_with_scales(w, "q8_0", q.scales, codes=q.codes, importance=torch.ones(256))
    q = search_scales(w, "q4_0", torch.ones(256))
    with pytest.raises(ValueError, match="either codes or v"):
        quantize_with_scales(w, "q4_0", *q, v=torch.zeros_like(w), importance=torch.ones(256))


# -- the tunable start -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_tunable_start_is_the_weighted_quantizer(name: str) -> None:
    """``alpha = beta = v = None`` from the weighted ``search_range``, stored with the importance (and the
    search's codes): ``to_gguf`` gives ``quantize(w, t, importance)`` byte for byte; the fake quantizer's values
    are ``to_gguf``'s without those codes (K-quants: the same values; the legacy types recompute their codes
    from the stored scales, never farther from the weights than llama.cpp's own)."""
    t = GGUF_TYPES[name]
    for seed, (case, zeros) in enumerate((("gauss", False), ("mixed", True))):
        w = _weights(case, (6, 512), seed)
        imp = _importance(512, seed, zeros)
        lo, hi = search_range(w, name, imp)
        assert torch.all(lo <= hi)
        reference = quantize(w, name, imp)
        codes = search_scales(w, name, imp).codes
        started = to_gguf(w, name, lo, hi, codes=codes, importance=imp)
        np.testing.assert_array_equal(to_bytes(started), to_bytes(reference))
        sw = stage2_weights(w, name, imp)
        without = to_gguf(w, name, lo, hi, importance=imp)
        w_hat, fake_codes = gguf_fake_quant(w, name, lo, hi, sub_weights=sw)
        assert torch.equal(fake_codes, without.codes)
        assert torch.equal(w_hat.view(torch.int32), dequantize(without).view(torch.int32))
        for field in ("d", "m", "dmin", "scales", "mins"):  # the stored scales are the weighted quantizer's
            a, b = getattr(without, field), getattr(reference, field)
            assert (a is None and b is None) or torch.equal(a.view(torch.int16) if a.dtype == torch.float16 else a,
                                                            b.view(torch.int16) if b.dtype == torch.float16 else b)  # fmt: skip
        if t.is_k_quant:
            assert torch.equal(w_hat, dequantize(reference))
        else:
            assert _weighted_error(w, without, imp) <= _weighted_error(w, reference, imp) * (1 + 1e-6)
