"""torch.compile in the tuning loop: the fake quantizer's fused kernels compute what the eager ones do, the
compiled block tunes (the quantized Linear is a graph break, not a crash), a block compile fails on is tuned
eagerly, and the automatic setting compiles only blocks large enough to pay for it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from signround.quant import fused
from signround.quant import int as qint
from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import block as block_mod
from signround.tuning import engine
from signround.tuning.block import TuneOptions, compiles

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(11))


def _qdq_step(gw: qint.GroupedWeight, spec: LayerSpec, weight_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One forward + backward of a fake-quantized Linear with v's signed step in the backward, from fixed
    parameters: what it computed and where the parameters went."""
    torch.manual_seed(0)
    v = torch.nn.Parameter(torch.rand(gw.shape) - 0.5)
    alpha = torch.nn.Parameter(torch.full(gw.wmin.shape, 0.95))
    beta = torch.nn.Parameter(torch.full(gw.wmin.shape, 0.9))
    x = torch.randn(16, gw.shape[1], dtype=torch.bfloat16, requires_grad=True)
    step = qint.SignStep(v.detach().view(gw.wg.shape), lambda: 0.01)
    out, rounded = gw.linear(x, spec, v, alpha, beta, torch.float16, None, step, qint.Workspace())
    codes = rounded.marked_codes.clone()
    out.float().square().sum().backward()
    return out.detach(), codes, v.detach().clone(), x.grad, alpha.grad, beta.grad


@pytest.mark.parametrize("sym", [True, False])
def test_the_fused_kernels_compute_what_the_eager_ones_do(monkeypatch, sym: bool) -> None:
    """Bit for bit: the forward's output and codes, v's signed step, the input's gradient, and the dequantized
    weight from codes; the clipping gradients (per-group sums in another order) to float32 rounding."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    spec = LayerSpec(bits=4, group_size=32, sym=sym)
    for weight_dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(7))
        gw = qint.GroupedWeight.of(weight.to(weight_dtype), 32)
        eager = _qdq_step(gw, spec, weight_dtype)
        with fused.allowed():
            assert fused.applies(gw.wg)
            compiled = _qdq_step(gw, spec, weight_dtype)
        assert fused._disabled is None  # the compiled path ran, not its fallback
        for name, a, b in zip(("out", "codes", "v", "grad x"), eager[:4], compiled[:4], strict=True):
            assert torch.equal(a, b), (name, weight_dtype)
        for a, b in zip(eager[4:], compiled[4:], strict=True):
            # (a group's two sums nearly cancel in places: a last-bit difference shows relative to the group)
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3 * a.abs().max().item())
        qt = qint.quantize(gw.wg.reshape(gw.shape), spec)
        with fused.allowed():
            once = qint.dequantize_rounded_once(qt, torch.bfloat16)
        assert torch.equal(once, qint.dequantize_rounded_once(qt, torch.bfloat16))


@pytest.mark.parametrize("use_fused", [False, True])
def test_the_symmetric_clip_scale_equals_autograd_through_the_composed_ops(monkeypatch, use_fused: bool) -> None:
    """The written-out scale and its clipping gradients are bit-identical to autograd through ``scale_and_zero``,
    eagerly and compiled; compiled, the scale is still rounded to its stored dtype (Inductor would otherwise keep
    the float32 -> float16 -> float32 round trip in float32)."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    gen = torch.Generator().manual_seed(5)
    gw = qint.GroupedWeight.of(torch.randn(64, 256, generator=gen), 32)
    start_alpha, start_beta = torch.rand(gw.wmin.shape, generator=gen), torch.rand(gw.wmin.shape, generator=gen)
    start_alpha[0, 0] = 0.0  # a clamped scale (|scale| below SCALE_EPS): its gradient stops there
    grad = torch.randn(gw.wmin.shape, generator=gen)

    def run(written_out: bool) -> tuple[torch.Tensor, ...]:
        alpha, beta = start_alpha.clone().requires_grad_(True), start_beta.clone().requires_grad_(True)
        if written_out:
            scale, zero = qint.tuning_scale_and_zero(gw.wmin, gw.wmax, spec, alpha, beta, torch.float16, use_fused)
        else:
            scale, zero = qint.scale_and_zero(gw.wmin, gw.wmax, spec, alpha, beta, torch.float16, ste=True)
        (scale * grad).sum().backward()
        return scale.detach(), zero, alpha.grad, beta.grad

    with fused.allowed():
        got = run(True)
    assert fused._disabled is None
    for name, a, b in zip(("scale", "zero", "grad alpha", "grad beta"), run(False), got, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(got[0], got[0].half().float())  # stored-dtype values
    assert bool((got[2] == 0).any()) and bool((got[2] != 0).any())


def test_outside_a_tuning_loop_nothing_is_compiled(monkeypatch) -> None:
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    assert not fused.applies(torch.zeros(4, 2, 32))
    with fused.allowed():
        assert fused.applies(torch.zeros(4, 2, 32))
        with fused.allowed(False):
            assert not fused.applies(torch.zeros(4, 2, 32))


def _plan(model):
    return resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=4, group_size=32))


def test_a_compiled_block_tunes_like_the_eager_one(tiny_llama_factory) -> None:
    """enable_torch_compile=True used to crash in Dynamo on the fake quantizer's autograd Function; now each
    tunable Linear is a graph break and the rest of the block is compiled.  Same data, same seed: the same
    losses up to the compiled kernels' float rounding."""
    losses = {}
    for flag in (False, True):
        model = tiny_llama_factory(seed=3, initializer_range=0.2)
        options = TuneOptions(iters=4, batch_size=2, show_progress=False, amp=False, enable_torch_compile=flag)
        losses[flag] = engine.run(model, _plan(model), IDS, None, options).block_losses
    for (init_e, final_e), (init_c, final_c) in zip(losses[False], losses[True], strict=True):
        assert init_c == pytest.approx(init_e, rel=1e-4)
        assert final_c == pytest.approx(final_e, rel=1e-2)
        assert final_c <= init_c


def test_a_block_compile_fails_on_is_tuned_eagerly_with_a_warning(tiny_llama_factory, monkeypatch, caplog) -> None:
    def broken(_module):
        def run(*_a, **_k):
            raise RuntimeError("backend exploded\nmore detail")

        return run

    results = {}
    for name, patch in (("eager", False), ("failed compile", True)):
        if patch:
            monkeypatch.setattr(block_mod.torch, "compile", broken)
        model = tiny_llama_factory(seed=4, initializer_range=0.2)
        options = TuneOptions(iters=3, batch_size=2, show_progress=False, amp=False, enable_torch_compile=patch)
        with caplog.at_level(logging.WARNING, logger="signround.tuning.block"):
            report = engine.run(model, _plan(model), IDS, None, options)
        results[name] = {n: q.codes for n, q in report.quantized.items()}
    assert "torch.compile failed on this block (RuntimeError: backend exploded); tuning it eagerly" in caplog.text
    assert results["eager"].keys() == results["failed compile"].keys()
    for name, codes in results["eager"].items():
        assert torch.equal(codes, results["failed compile"][name]), name


def test_by_default_only_large_blocks_on_one_device_compile() -> None:
    def tunables(*shapes: tuple[int, int]) -> dict:
        return {str(i): SimpleNamespace(linear=SimpleNamespace(weight=torch.empty(s))) for i, s in enumerate(shapes)}

    small, large = tunables((64, 64), (128, 64)), tunables((1536, 576), (576, 1536), (1536, 576))
    auto = TuneOptions(iters=50)
    assert not compiles(auto, small)
    assert compiles(auto, large)
    assert not compiles(TuneOptions(iters=5), large)  # too few iterations to pay for a compile
    assert not compiles(TuneOptions(iters=50, device=("cpu", "cpu")), large)  # spread over devices: asked only
    moe = torch.nn.Module()
    moe.mlp = torch.nn.Module()
    moe.mlp.experts = torch.nn.ModuleList()
    assert not compiles(auto, large, moe)  # routing: not by default
    assert compiles(auto, large, torch.nn.Linear(2, 2))
    assert compiles(TuneOptions(iters=5, enable_torch_compile=True), small)
    assert not compiles(TuneOptions(iters=50, enable_torch_compile=False), large)
