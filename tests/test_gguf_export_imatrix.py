"""The calibration data's importance in GGUF runs, end to end on stories260K: ``iters=0`` writes llama.cpp's
importance-matrix quantization of every calibrated layer (``llama-quantize --imatrix``'s bytes for the importance
the engine measured), which differs from the unweighted one and has a lower activation-weighted error
``sum_j imp_j (w - q)^2``; ``disable_opt_rtn=True`` keeps llama.cpp's unweighted bytes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround.quant import gguf

pytest.importorskip("gguf", reason="GGUF export needs gguf-py (pip install gguf)")


def _run(stories_dir, shakespeare, type_name: str = "q4_1", **kwargs) -> dict[str, gguf.GGUFQuantized]:
    ar = signround.AutoRound(
        str(stories_dir), format=f"gguf:{type_name}", iters=0, nsamples=8, seqlen=32, batch_size=4, dataset=str(shakespeare),
        dtype=torch.float32, show_progress=False, **kwargs,
    )  # fmt: skip
    ar.quantize()
    return ar.result.report.quantized


def _weighted_error(w: torch.Tensor, q: gguf.GGUFQuantized, importance: torch.Tensor) -> float:
    return float((importance * (w - gguf.dequantize(q)) ** 2).sum())


def test_iters_0_starts_from_the_importance_weighted_quantizer(stories_dir, shakespeare, monkeypatch):
    seen: list[tuple[torch.Tensor, str, torch.Tensor]] = []  # (weight, type, importance) of each weighted call
    plain_quantize = gguf.quantize

    def recording(w, type_name, importance=None):
        if importance is not None:
            seen.append((w.detach().clone(), type_name, importance.detach().clone()))
        return plain_quantize(w, type_name, importance)

    monkeypatch.setattr(gguf, "quantize", recording)
    weighted = _run(stories_dir, shakespeare)
    monkeypatch.setattr(gguf, "quantize", plain_quantize)
    plain = _run(stories_dir, shakespeare, disable_opt_rtn=True)

    original = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    assert weighted.keys() == plain.keys()
    better = compared = 0
    for name, q in weighted.items():
        w = original.get_submodule(name).weight.detach()
        reference = plain_quantize(w, q.type_name)
        assert torch.equal(torch.from_numpy(gguf.to_bytes(plain[name])), torch.from_numpy(gguf.to_bytes(reference)))
        calls = [(t, imp) for seen_w, t, imp in seen if seen_w.shape == w.shape and torch.equal(seen_w, w)]
        if q.type_name == "q8_0" or not calls:  # llama.cpp's q8_0 ignores an importance; uncalibrated layers
            continue
        (type_name, imp), *_ = calls
        assert type_name == q.type_name and bool(imp.any())
        assert torch.equal(
            torch.from_numpy(gguf.to_bytes(q)), torch.from_numpy(gguf.to_bytes(gguf.quantize(w, type_name, imp)))
        )
        assert not torch.equal(q.codes, plain[name].codes) or not torch.equal(q.d, plain[name].d)
        compared += 1
        better += _weighted_error(w, q, imp) < _weighted_error(w, plain[name], imp)
    blocks = sum(1 for name in weighted if ".layers." in name and weighted[name].type_name != "q8_0")
    assert compared >= blocks > 0
    assert better == compared, (better, compared)


def test_q4_0_starts_per_block_from_the_better_of_llama_cpp_s_search_and_optimised_rtn(
    stories_dir, shakespeare, monkeypatch
):
    """q4_0 is int.py's W4G32 sym grid: each block of 32 starts from llama.cpp's importance-matrix search or from
    optimised RTN's clipping, whichever has the lower activation-weighted error; so no block is worse than
    llama-quantize --imatrix's, and some are better."""
    from signround.tuning import engine

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, importance) of each calibrated layer
    start = engine._layer_start

    def recording(linear, spec, importance, options, *args):
        if importance is not None:
            seen.append((linear.weight.detach().clone(), importance.detach().clone()))
        return start(linear, spec, importance, options, *args)

    monkeypatch.setattr(engine, "_layer_start", recording)
    result = _run(stories_dir, shakespeare, "q4_0")
    original = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    checked = better = 0
    for name, q in result.items():
        w = original.get_submodule(name).weight.detach()
        found = [imp for seen_w, imp in seen if seen_w.shape == w.shape and torch.equal(seen_w, w)]
        if not found:
            continue
        imp = found[0]
        llama = gguf.quantize(w, "q4_0", imp)
        ours_err = (imp * (w - gguf.dequantize(q)) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        llama_err = (imp * (w - gguf.dequantize(llama)) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        assert bool((ours_err <= llama_err * (1 + 1e-6) + 1e-12).all()), name
        better += int((ours_err < llama_err).sum())
        checked += 1
    assert checked >= 5 * 6 and better > 0  # (ffn_down: 172-wide rows, no 32-blocks: left in 16 bit)


@pytest.mark.parametrize("type_name, bits", [("q4_0", 4), ("q5_0", 5)])
def test_legacy_tuning_moves_from_optimised_rtn_while_the_exact_start_is_the_better_block(type_name, bits) -> None:
    """q4_0 / q5_0: SignRound moves from optimised RTN's clipping of each block's own range (int.py's W4G32 /
    W5G32 sym start, ``alpha`` / ``beta`` free to move both ways below 1), while the start judged against the tuned
    result is, per block, the better of that and llama.cpp's importance-matrix blocks: some blocks of each."""
    from signround.quant.gguf_tunable import search_range, to_gguf
    from signround.schemes import LayerSpec
    from signround.tuning.rtn import gguf_legacy_start

    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    importance = torch.rand(256) ** 3
    spec = LayerSpec(bits=bits, group_size=32, sym=True, data_type=f"gguf:{type_name}")
    (lo, hi, alpha, beta), start = gguf_legacy_start(w, spec, importance)
    full_lo, full_hi = search_range(w, type_name, None)
    assert torch.equal(lo, full_lo) and torch.equal(hi, full_hi)
    assert bool(((alpha > 0) & (alpha <= 1) & (beta > 0) & (beta <= 1)).all())
    tuned_from = to_gguf(w, type_name, lo, hi, alpha, beta)
    llama = gguf.quantize(w, type_name, importance)
    from_rtn = start.d == tuned_from.d
    from_llama = start.d == llama.d
    assert bool((from_rtn | from_llama).all())
    assert bool((from_rtn & ~from_llama).any()) and bool((from_llama & ~from_rtn).any())


def test_a_gguf_layers_start_is_its_importance_unless_disabled_or_empty() -> None:
    """The engine starts a GGUF layer (block loop, head) from llama.cpp's importance-matrix quantizer with the
    inputs' importance; ``disable_opt_rtn``, no importance, or one nothing reached: no importance,
    llama.cpp's quantizer without one.  Through ``quantize_weight`` that is ``gguf.quantize`` with / without it."""
    from signround.quant.dispatch import quantize_weight
    from signround.schemes import LayerSpec
    from signround.tuning.block import TuneOptions
    from signround.tuning.engine import _layer_start

    linear = torch.nn.Linear(64, 8, bias=False)
    spec = LayerSpec(bits=4, group_size=32, sym=True, data_type="gguf:q4_0")
    imp = torch.rand(64) + 0.1
    assert _layer_start(linear, spec, imp, TuneOptions(iters=0)).importance is imp
    assert _layer_start(linear, spec, imp, TuneOptions(iters=0, disable_opt_rtn=True)).importance is None
    assert _layer_start(linear, spec, torch.zeros(64), TuneOptions(iters=0)).importance is None
    assert _layer_start(linear, spec, None, TuneOptions(iters=0)).importance is None
    w = linear.weight.detach()
    weighted = quantize_weight(w, spec, importance=imp)
    assert (gguf.to_bytes(weighted) == gguf.to_bytes(gguf.quantize(w, "q4_0", imp))).all()
    assert not (gguf.to_bytes(weighted) == gguf.to_bytes(quantize_weight(w, spec))).all()
