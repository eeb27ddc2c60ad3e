"""quant_lm_head=True: the head is tuned with SignRound toward the full-precision model's next-token
distributions (KL of the softmax), on the quantized stream (the tuned blocks' outputs), not only quantized with
optimised RTN."""

from __future__ import annotations

import pytest
import torch

from signround.quant.dispatch import dequantize_weight
from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import engine, head
from signround.tuning.block import TuneOptions

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(5))


def _plan(model, bits: int = 2):
    return resolve_plan(engine.quantizable_layers(model, include_lm_head=True), LayerSpec(bits=bits, group_size=32))


def _mean_kl(model, reference_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_reference || p_model): the evaluation's measure, independent of the code under test."""
    with torch.no_grad():
        p = reference_logits.log_softmax(-1)
        q = model(IDS).logits.float().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()


def test_the_head_loss_is_the_models_kl_and_tuning_lowers_it(tiny_llama_factory, monkeypatch) -> None:
    """The reported head losses are the whole quantized model's mean KL divergence from the full-precision model's
    next-token distributions on the calibration ids, with the head at its start (optimised RTN) and as kept.  So
    the head is fed the quantized stream and judged against the fp distributions, and the kept head is strictly
    better than its start."""
    model = tiny_llama_factory(seed=1, initializer_range=0.2)
    with torch.no_grad():
        reference = model(IDS).logits.float()
    fp_head = model.lm_head.weight.detach().clone()
    starts = []
    real = engine.tune_head
    monkeypatch.setattr(
        engine, "tune_head", lambda h, spec, start, *a, **k: starts.append(start) or real(h, spec, start, *a, **k)
    )
    options = TuneOptions(iters=30, batch_size=2, show_progress=False, amp=False)
    report = engine.run(model, _plan(model), IDS, None, options)

    assert report.head_loss is not None
    init, final = report.head_loss
    assert final < init
    assert torch.equal(model.lm_head.weight, dequantize_weight(report.quantized["lm_head"], model.lm_head.weight.dtype))
    assert _mean_kl(model, reference) == pytest.approx(final, rel=1e-3)
    (start,) = starts
    spec = report.quantized["lm_head"].spec
    with torch.no_grad():
        tuned = model.lm_head.weight.clone()
        model.lm_head.weight.copy_(
            dequantize_weight(start.quantized(fp_head, spec, options.scale_dtype), torch.float32)
        )
    assert not torch.equal(model.lm_head.weight, tuned)  # tuning moved the head
    assert _mean_kl(model, reference) == pytest.approx(init, rel=1e-3)


def test_without_iters_the_head_keeps_optimised_rtn(tiny_llama) -> None:
    report = engine.run(tiny_llama, _plan(tiny_llama), IDS, None, TuneOptions(iters=0, show_progress=False))
    assert report.head_loss is None
    assert "lm_head" in report.quantized


def test_the_heads_token_batch_bounds_its_logits(tiny_llama_factory, monkeypatch) -> None:
    """Norm and head act per token, so the head is batched by tokens: a batch's logits stay within LOGIT_BYTES
    (a 150k vocabulary at seqlen 2048 would otherwise need gigabytes per batch); a small budget still tunes."""
    options = TuneOptions(batch_size=8)
    assert head.tokens_per_batch(options, seqlen=256, vocab=49152) == 2048
    assert head.tokens_per_batch(options, seqlen=2048, vocab=151936) == head.LOGIT_BYTES // (4 * 151936)
    monkeypatch.setattr(head, "LOGIT_BYTES", 4 * 512 * 7)  # seven tokens of a 512-word vocabulary per batch
    seen: list[int] = []
    real = head._LogitTargets.__getitem__
    monkeypatch.setattr(head._LogitTargets, "__getitem__", lambda self, idx: seen.append(len(idx)) or real(self, idx))
    model = tiny_llama_factory(seed=2, initializer_range=0.2)
    report = engine.run(model, _plan(model), IDS, None, TuneOptions(iters=10, batch_size=2, show_progress=False))
    assert max(seen) == 7
    init, final = report.head_loss
    assert final <= init
