"""Tuning: SignSGD and its schedule, (optimised) RTN, one block's loop, input capture and the block walk."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from signround.quant.int import dequantize, fake_quant, group_view, quantize
from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import engine
from signround.tuning.block import (
    LayerStart,
    TunableLinear,
    TuneOptions,
    block_output,
    clamp_after_step,
    run_block,
    tune_block,
)
from signround.tuning.inputs import BlockInputs, capture_block_inputs
from signround.tuning.objectives import MSE
from signround.tuning.rtn import FACTOR_MIN, optimized_rtn_params, plain_rtn_params
from signround.tuning.signsgd import SignSGD, default_lr, linear_decay


# -- SignSGD and the learning-rate schedule --------------------------------------------------------------------------
def test_signsgd_step_is_minus_lr_times_sign_of_grad() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    q = nn.Parameter(torch.tensor([7.0]))  # no gradient: left alone
    opt = SignSGD([p, q], lr=0.1)
    p.grad = torch.tensor([0.3, -5.0, 0.0, 1e-8])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 3.0, 0.5]) - 0.1 * torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert q.item() == 7.0
    # per-group learning rates
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = SignSGD([{"params": [a], "lr": 0.5}, {"params": [b], "lr": 0.25}], lr=1.0)
    a.grad, b.grad = torch.tensor([-1.0, 2.0]), torch.tensor([3.0, -4.0])
    opt.step()
    assert a.tolist() == [0.5, -0.5] and b.tolist() == [-0.25, 0.25]


@pytest.mark.parametrize("lr", [0.0, -0.1])
def test_signsgd_rejects_non_positive_lr(lr: float) -> None:
    with pytest.raises(ValueError, match="lr must be > 0"):
        SignSGD([nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(
    ("iters", "bits", "expected"),
    [
        (200, 4, 0.25 / 200),  # below 1000 iterations a total movement of 0.25: 1.25e-3 at 200
        (200, 3, 0.25 / 200),
        (200, 2, 0.5 / 200),  # at <= 2 bits 0.5: 2.5e-3 at 200
        (100, 2, 0.5 / 100),
        (999, 2, 0.5 / 999),
        (999, 4, 0.25 / 999),
        (1000, 3, 2 / 1000),  # from 1000 iterations the reference's rules
        (1000, 2, 2 / 1000),
        (1000, 4, 1 / 1000),
        (5000, 8, 1 / 5000),
        (50, 4, 5e-3),  # short runs keep the 50-iteration step instead of growing it to 1/iters
        (50, 2, 1e-2),
        (10, 2, 1e-2),
        (10, 3, 5e-3),
        (1, 4, 5e-3),
        (0, 4, 0.0),
    ],
)
def test_default_lr_rules(iters: int, bits: int, expected: float) -> None:
    assert default_lr(iters, bits) == pytest.approx(expected, rel=1e-12)


def test_the_gguf_two_bit_type_keeps_the_common_movement() -> None:
    """The doubled movement at <= 2 bits was measured on the integer grids only; gguf:q2_k keeps 0.25 / iters."""
    assert default_lr(50, 2, "gguf:q2_k") == pytest.approx(5e-3)
    assert default_lr(200, 2, "gguf:q2_k") == pytest.approx(1.25e-3)
    assert default_lr(200, 2, "int") == pytest.approx(2.5e-3)


def test_linear_decay_reaches_zero() -> None:
    iters = 8
    p = nn.Parameter(torch.zeros(1))
    opt = SignSGD([{"params": [p], "lr": 0.4}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2}], lr=0.4)
    sched = linear_decay(opt, iters)
    seen = []
    for _ in range(iters):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [lrs[0] for lrs in seen] == pytest.approx([0.4 * (1 - k / iters) for k in range(iters)])
    assert [lrs[1] for lrs in seen] == pytest.approx([0.2 * (1 - k / iters) for k in range(iters)])
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    sched.step()  # past the end it stays at 0, never negative
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]


# -- RTN -------------------------------------------------------------------------------------------------------------
def _weighted_error(w, spec, importance, alpha, beta) -> torch.Tensor:
    """Per-group sum of importance_j * (w_j - q(w_j))^2, computed through quantize/dequantize."""
    err = (dequantize(quantize(w, spec, None, alpha, beta)) - w).square() * importance
    return group_view(err, spec.group_size).sum(-1)


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, True), (3, 64, False), (4, 32, False), (4, -1, True)])
def test_optimized_rtn_never_worse_than_plain(bits: int, group_size: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + (group_size % 7))
    w = torch.randn(24, 128, generator=gen) * 0.05
    w[torch.rand(w.shape, generator=gen) < 0.01] *= 8  # outliers: where clipping pays off
    importance = torch.rand(128, generator=gen) ** 3 * 10
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    a0, b0 = plain_rtn_params(w, spec)
    assert torch.equal(a0, torch.ones_like(a0)) and torch.equal(b0, torch.ones_like(b0))
    alpha, beta = optimized_rtn_params(w, spec, importance)
    low = FACTOR_MIN
    assert alpha.shape == a0.shape and bool(((alpha >= low) & (alpha <= 1)).all() & ((beta >= low) & (beta <= 1)).all())
    plain = _weighted_error(w, spec, importance, a0, b0)
    opt = _weighted_error(w, spec, importance, alpha, beta)
    assert bool((opt <= plain * (1 + 1e-6)).all()), "optimised RTN made a group worse"
    assert opt.sum() < plain.sum()  # and it does find something better somewhere


def test_optimized_rtn_sym_can_flip_which_end_sets_the_scale() -> None:
    """3-bit full-range sym: [1.0, -0.95 x3] maps 1.0 onto -4 and clips every -0.95 to +3 (error 0.2 each,
    0.12 total squared); letting the negative end set the scale (0.95/4) clips only 1.0 (4.21 -> 3, error
    0.2875, 0.083 squared).  Only a one-end sweep (beta < 0.95) can reach that orientation."""
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([1.0, -0.95, -0.95, -0.95])
    spec = LayerSpec(bits=3, group_size=32, sym=True)
    alpha, beta = optimized_rtn_params(w, spec, None)
    assert float(beta) < 0.95 <= float(alpha)
    ones = torch.ones(32)
    plain = _weighted_error(w, spec, ones, *plain_rtn_params(w, spec))
    assert float(_weighted_error(w, spec, ones, alpha, beta)) < 0.7 * float(plain)


def test_optimized_rtn_uses_importance() -> None:
    """With all importance on one input feature, that feature's error must be no larger than with uniform weights."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen) * 0.05
    w[:, 0] = 0.2  # feature 0 sets the range of every group
    spec = LayerSpec(bits=2, group_size=32)
    focus = torch.full((32,), 1e-6)
    focus[5] = 1.0
    err5 = []
    for imp in (None, focus):
        a, b = optimized_rtn_params(w, spec, imp)
        err5.append((dequantize(quantize(w, spec, None, a, b)) - w)[:, 5].square().sum().item())
    assert err5[1] <= err5[0]


# -- one block -------------------------------------------------------------------------------------------------------
def _block_setup(tiny_llama_factory, n: int = 8, seq: int = 32):
    model = tiny_llama_factory(seed=1, initializer_range=0.2)  # large weights: 2-bit RTN is clearly lossy
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(2))
    inputs = capture_block_inputs(model, model.model.layers[0], ids)
    block = model.model.layers[0]
    targets = run_block(block, inputs, n)
    return model, block, inputs, targets


def _mse(block, inputs, targets) -> float:
    """The block loop's objective on the whole set: each token's squared error over its target's mean square."""
    out = run_block(block, inputs, len(inputs))
    return ((out - targets).square() / targets.square().mean(-1, keepdim=True)).mean().item()


def test_tune_block_improves_and_reports_true_losses(tiny_llama_factory) -> None:
    _model, block, inputs, targets = _block_setup(tiny_llama_factory)
    spec = LayerSpec(bits=2, group_size=32)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    layers = {n: (m, spec, plain_rtn_params(m.weight, spec)) for n, m in linears.items()}

    rtn_block = copy.deepcopy(block)  # the starting point, computed independently
    for m in rtn_block.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(dequantize(quantize(m.weight, spec)))
    rtn_loss = _mse(rtn_block, inputs, targets)
    fp_weights = {n: m.weight.clone() for n, m in linears.items()}

    with torch.enable_grad():
        options = TuneOptions(iters=20, batch_size=4, show_progress=False, amp=False)  # exact fp32 losses
        result = tune_block(block, layers, inputs, targets, options)

    assert result.init_loss == pytest.approx(rtn_loss, rel=1e-5)
    assert result.final_loss <= result.init_loss
    assert result.final_loss < 0.9 * result.init_loss  # 20 SignSGD steps on 2-bit weights do help
    assert len(result.losses) == 20
    # the block now holds exactly the dequantized tensors, and its loss is the reported final loss
    assert set(result.quantized) == set(linears)
    for name, m in block.named_modules():
        if name in linears:
            assert isinstance(m, nn.Linear), "TunableLinear left in the block"
            assert torch.equal(m.weight, dequantize(result.quantized[name]))
            assert not torch.equal(m.weight, fp_weights[name])
    assert _mse(block, inputs, targets) == pytest.approx(result.final_loss, rel=1e-5)


def test_without_write_back_the_weights_stay_and_the_result_is_the_same(tiny_llama_factory) -> None:
    """low_cpu_mem_usage packs each block at once, so tuning need not write dequantized weights back (that write
    copied every memory-mapped weight into RAM): the Linear weights stay untouched, the quantized tensors and the
    outputs fed to the next block are those of a run that writes back."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory)
    spec = LayerSpec(bits=2, group_size=32)
    runs = {}
    for write_back in (True, False):
        b = copy.deepcopy(block)
        linears = {n: m for n, m in b.named_modules() if isinstance(m, nn.Linear)}
        before = {n: m.weight.clone() for n, m in linears.items()}
        layers = {n: (m, spec, plain_rtn_params(m.weight, spec)) for n, m in linears.items()}
        options = TuneOptions(iters=5, batch_size=4, show_progress=False, amp=False, write_back=write_back)
        with torch.enable_grad():
            runs[write_back] = tune_block(b, layers, inputs, targets, options)
        changed = {n for n, m in linears.items() if not torch.equal(m.weight, before[n])}
        assert changed == (set(linears) if write_back else set())
    kept, written = runs[False], runs[True]
    assert kept.outputs is not None and torch.equal(kept.outputs, written.outputs)
    for name, qt in written.quantized.items():
        assert torch.equal(kept.quantized[name].codes, qt.codes)
        assert torch.equal(kept.quantized[name].scales, qt.scales)


def test_tune_block_with_bf16_autocast_still_improves(tiny_llama_factory) -> None:
    """amp=True (the default) runs the loop's matmuls in bf16 where the CPU has native bf16; losses stay close
    to the float32 ones and tuning still never ends above its start."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory)
    spec = LayerSpec(bits=2, group_size=32)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    rtn_block = copy.deepcopy(block)
    for m in rtn_block.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(dequantize(quantize(m.weight, spec)))
    layers = {n: (m, spec, plain_rtn_params(m.weight, spec)) for n, m in linears.items()}
    with torch.enable_grad():
        result = tune_block(block, layers, inputs, targets, TuneOptions(iters=20, batch_size=4, show_progress=False))
    assert result.init_loss == pytest.approx(_mse(rtn_block, inputs, targets), rel=2e-2)
    assert result.final_loss <= result.init_loss
    assert _mse(block, inputs, targets) < _mse(rtn_block, inputs, targets)


@pytest.mark.parametrize("lr", [None, 1.0])
def test_tune_block_never_returns_worse_than_init(tiny_llama_factory, lr) -> None:
    """Even with a learning rate far too large the result is no worse than the (optimised RTN) start."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=6, seq=16)
    spec = LayerSpec(bits=4, group_size=32, sym=False)
    layers = {
        n: (m, spec, optimized_rtn_params(m.weight, spec)) for n, m in block.named_modules() if isinstance(m, nn.Linear)
    }
    opts = TuneOptions(iters=6, lr=lr, batch_size=2, gradient_accumulate_steps=2, show_progress=False, amp=False)
    with torch.enable_grad():
        result = tune_block(block, layers, inputs, targets, opts)
    if lr == 1.0:
        assert max(result.losses) > result.init_loss  # the steps did go wrong: the guard had work to do
    assert result.final_loss <= result.init_loss
    assert _mse(block, inputs, targets) == pytest.approx(result.final_loss, rel=1e-5)


def test_tune_block_iters_zero_is_rtn_with_given_params(tiny_llama_factory) -> None:
    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=2, seq=8)
    spec = LayerSpec(bits=3, group_size=32)
    linear = block.self_attn.o_proj
    w = linear.weight.clone()
    alpha, beta = optimized_rtn_params(w, spec)
    result = tune_block(
        block, {"self_attn.o_proj": (linear, spec, (alpha, beta))}, inputs, targets, TuneOptions(iters=0)
    )
    assert result.init_loss is None and result.final_loss is None
    assert torch.equal(block.self_attn.o_proj.weight, dequantize(quantize(w, spec, None, alpha, beta)))


def test_v_step_in_backward_is_the_optimizer_step_and_frees_the_gradient() -> None:
    """With one batch per step, v's signed step runs inside the backward as soon as its gradient is ready: the
    same update as SignSGD's step + clamp, and no v gradient is left once the backward is done."""
    gen = torch.Generator().manual_seed(3)
    spec = LayerSpec(bits=2, group_size=32)
    x = torch.randn(6, 64, generator=gen)
    target = torch.randn(6, 48, generator=gen)
    lr = 0.3  # large, so that clamping to [-0.5, 0.5] matters
    moved = []
    for fused in (True, False):
        linear = nn.Linear(64, 48, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(48, 64, generator=torch.Generator().manual_seed(4)))
        tl = TunableLinear(linear, spec, *plain_rtn_params(linear.weight, spec), torch.float16)
        with torch.no_grad():
            tl.v.copy_(torch.rand(48, 64, generator=torch.Generator().manual_seed(5)) - 0.5)
        remove = tl.step_v_in_backward(lambda: lr) if fused else None
        F.mse_loss(tl(x), target).backward()
        if fused:
            assert tl.v.grad is None  # released inside the backward
            assert tl.alpha.grad is not None  # the clipping factors still take the optimizer's step
            remove()
        else:
            SignSGD([tl.v], lr=lr).step()
            clamp_after_step({"layer": tl}, {})
        moved.append(tl.v.detach().clone())
    assert torch.equal(moved[0], moved[1])
    assert float(moved[0].abs().max()) == 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tuning_state_per_weight_is_within_the_placement_budget(dtype) -> None:
    """What a tuned Linear holds between its forward and its backward, beyond its weight and input: v, the codes
    (saved and returned: one tensor) and per-group scales.  Placement budgets TUNING_BYTES_PER_WEIGHT for it."""
    from signround.placement import TUNING_BYTES_PER_WEIGHT

    spec = LayerSpec(bits=4, group_size=32)
    linear = nn.Linear(256, 128, bias=False).to(dtype)
    tl = TunableLinear(linear, spec, *plain_rtn_params(linear.weight, spec), torch.float16)
    x = torch.randn(4, 256, dtype=dtype)
    out = tl(x)
    held = {t.data_ptr(): t for t in out.grad_fn.saved_tensors if t.data_ptr() not in (x.data_ptr(),)}
    held.pop(linear.weight.data_ptr(), None)  # the weight as stored: no float32 copy of it is among them
    held.update({tl.v.data_ptr(): tl.v, tl.last.marked_codes.data_ptr(): tl.last.marked_codes})
    state = sum(t.numel() * t.element_size() for t in held.values())
    assert all(t.dtype != torch.float32 or t.numel() < linear.weight.numel() for t in held.values() if t is not tl.v)
    assert state <= TUNING_BYTES_PER_WEIGHT * linear.weight.numel()
    assert state < 6 * linear.weight.numel()  # v (4 bytes) + one code byte + per-group scales


def test_the_kept_best_step_is_packed_with_the_codes_that_step_computed(tiny_llama_factory, monkeypatch) -> None:
    """The loop keeps the minibatch winner as its codes and reuses other steps' code buffers: what is packed for
    the winner must be exactly what its forward computed, untouched by the steps after it."""
    from signround.quant import int as quant_int

    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=8, seq=16)
    spec = LayerSpec(bits=2, group_size=32)
    layers = {
        n: (m, spec, plain_rtn_params(m.weight, spec)) for n, m in block.named_modules() if isinstance(m, nn.Linear)
    }
    seen: list[dict[str, torch.Tensor]] = []  # per forward, the codes of every layer (copies, in call order)
    linear = quant_int.GroupedWeight.linear

    def recording(self, *args, **kwargs):
        out, rounded = linear(self, *args, **kwargs)
        if not seen or len(seen[-1]) == len(layers):
            seen.append({})
        seen[-1][len(seen[-1])] = rounded.quantized(torch.float16).codes.clone()
        return out, rounded

    monkeypatch.setattr(quant_int.GroupedWeight, "linear", recording)
    # the last iterate would usually win: make it lose, so that the kept minibatch winner is what gets packed
    last = TunableLinear.quantized

    def worst(self):
        qt = last(self)
        return dataclasses.replace(qt, codes=torch.zeros_like(qt.codes))

    monkeypatch.setattr(TunableLinear, "quantized", worst)
    with torch.enable_grad():
        result = tune_block(
            block, layers, inputs, targets, TuneOptions(iters=12, batch_size=2, show_progress=False, lr=0.3)
        )
    assert 0 < result.best_iter < 11, "this setting should keep a step in the middle (else the test shows nothing)"
    kept = seen[result.best_iter]
    assert len(kept) == len(layers)
    for position, name in enumerate(layers):  # the block calls its layers in definition order here
        assert torch.equal(result.quantized[name].codes, kept[position]), name


class _PlainTunable(nn.Module):
    """The textbook SignRound layer: float32 master, v / alpha / beta as parameters, autograd through the matmul."""

    def __init__(self, linear: nn.Linear, spec: LayerSpec, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.weight, self.spec = linear.weight.detach().float(), spec
        self.v = nn.Parameter(torch.zeros_like(self.weight))
        self.alpha, self.beta = nn.Parameter(alpha.float().clone()), nn.Parameter(beta.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.spec, self.v, self.alpha, self.beta))


def _plain_signround(block, layers, inputs, targets, iters: int, lr: float, bs: int, seed: int):
    """SignRound as the paper writes it: SignSGD on v, alpha, beta with a linear decay, copies of the parameters
    at the best minibatch loss, then last / best / start judged on the whole set; returns (best_iter, packed)."""
    tunables = {name: _PlainTunable(linear, spec, *ab) for name, (linear, spec, ab) in layers.items()}
    for name, t in tunables.items():
        block.set_submodule(name, t)
    params = [p for t in tunables.values() for p in (t.v, t.alpha, t.beta)]
    optimizer = SignSGD(params, lr=lr)
    scheduler = linear_decay(optimizer, iters)
    generator = torch.Generator().manual_seed(seed)
    start = [p.detach().clone() for p in params]
    best, best_loss, best_iter = start, float("inf"), -1
    for it in range(iters):
        idx = torch.randperm(len(inputs), generator=generator)[:bs]
        h, kw = inputs.batch(idx)
        loss = F.mse_loss(block_output(block(h, **kw)), targets[idx])
        if loss.item() < best_loss:
            best, best_loss, best_iter = [p.detach().clone() for p in params], loss.item(), it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t in tunables.values():
                t.v.clamp_(-0.5, 0.5), t.alpha.clamp_(0, 1), t.beta.clamp_(0, 1)
        scheduler.step()
    results = []
    for state, iteration in (([p.detach().clone() for p in params], iters), (best, best_iter), (start, -1)):
        with torch.no_grad():
            for p, value in zip(params, state, strict=True):
                p.copy_(value)
            loss = F.mse_loss(run_block(block, inputs, bs), targets).item()
            packed = {n: quantize(t.weight, t.spec, t.v, t.alpha, t.beta) for n, t in tunables.items()}
        results.append((loss, iteration, packed))
    for name, (linear, _spec, _ab) in layers.items():
        block.set_submodule(name, linear)
    loss, iteration, packed = min(results, key=lambda r: r[0])
    return iteration, packed


def test_the_engine_computes_what_textbook_signround_computes(tiny_llama_factory) -> None:
    """The engine's memory-saving loop (codes instead of copies, v's step inside the backward, recomputed
    weights, shared buffers) against a plain implementation of the same algorithm, in float32: the same kept
    step and the same codes (up to the summation order of a matmul, which can flip a rounding on a tie)."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=8, seq=16)
    spec = LayerSpec(bits=2, group_size=32)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    layers = {n: (m, spec, optimized_rtn_params(m.weight, spec)) for n, m in linears.items()}
    plain = copy.deepcopy(block)
    plain_layers = {n: (plain.get_submodule(n), spec, ab) for n, (_m, _s, ab) in layers.items()}
    with torch.enable_grad():
        options = TuneOptions(  # the textbook's parameters: v, alpha and beta alike; no norms
            iters=10, batch_size=4, show_progress=False, amp=False, enable_norm_bias_tuning=False,
            enable_minmax_tuning=True,
        )  # fmt: skip
        result = tune_block(block, layers, inputs, targets, options, objective=MSE)  # the textbook's loss
        lr = default_lr(10, spec.bits)  # what the engine takes when none is given
        best_iter, packed = _plain_signround(plain, plain_layers, inputs, targets, iters=10, lr=lr, bs=4, seed=42)
    assert result.best_iter == best_iter
    for name in linears:
        same = (result.quantized[name].codes == packed[name].codes).float().mean().item()
        assert same > 0.999, f"{name}: {same:.4f} of the codes agree"


# -- input capture ---------------------------------------------------------------------------------------------------
def _first_block_outputs(model, ids, mask=None) -> torch.Tensor:
    """Block 0's real outputs during a normal batched forward (the oracle for replays)."""
    seen = []
    handle = model.model.layers[0].register_forward_hook(
        lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def test_capture_block_inputs_without_mask_shares_everything(tiny_llama) -> None:
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(tiny_llama, tiny_llama.model.layers[0], ids)
    assert isinstance(inputs, BlockInputs) and len(inputs) == 3
    assert torch.equal(inputs.hidden, tiny_llama.model.embed_tokens(ids))
    assert inputs.per_sample == {}
    assert "position_embeddings" in inputs.shared
    cos, sin = inputs.shared["position_embeddings"]
    assert cos.shape[0] == 1 and sin.shape[0] == 1  # stored once, broadcast over the batch
    assert inputs.shared.get("use_cache", False) is False
    replay = run_block(tiny_llama.model.layers[0], inputs, batch_size=2)
    torch.testing.assert_close(replay, _first_block_outputs(tiny_llama, ids), rtol=1e-5, atol=1e-6)


def test_capture_block_inputs_keeps_padding_masks_per_sample(tiny_llama) -> None:
    ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :1] = 0
    mask[1, :4] = 0
    mask[2, :2] = 0  # every sample padded differently
    inputs = capture_block_inputs(tiny_llama, tiny_llama.model.layers[0], ids, mask)
    assert set(inputs.per_sample) == {"attention_mask"}
    assert inputs.per_sample["attention_mask"].shape[0] == 3
    assert "position_embeddings" in inputs.shared and "attention_mask" not in inputs.shared
    # a batch picks the matching rows of per-sample values and keeps shared ones as they are
    h, kw = inputs.batch(torch.tensor([2, 0]))
    assert torch.equal(h, inputs.hidden[[2, 0]])
    assert torch.equal(kw["attention_mask"], inputs.per_sample["attention_mask"][[2, 0]])
    assert kw["position_embeddings"] is inputs.shared["position_embeddings"]
    replay = run_block(tiny_llama.model.layers[0], inputs, batch_size=3)
    expected = _first_block_outputs(tiny_llama, ids, mask)
    keep = mask.bool()  # padded positions are garbage either way
    torch.testing.assert_close(replay[keep], expected[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_capture_block_inputs_mixed_padded_and_unpadded(tiny_llama, attn: str) -> None:
    """sdpa gives an unpadded sample no mask (None) and a padded one a 4D bool mask; eager gives float masks."""
    tiny_llama.set_attn_implementation(attn)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0  # sample 0 unpadded (sdpa: mask None), sample 1 padded (4D mask)
    inputs = capture_block_inputs(tiny_llama, tiny_llama.model.layers[0], ids, mask)
    replay = run_block(tiny_llama.model.layers[0], inputs, batch_size=2)
    keep = mask.bool()
    torch.testing.assert_close(replay[keep], _first_block_outputs(tiny_llama, ids, mask)[keep], rtol=1e-5, atol=1e-6)


# -- the block walk --------------------------------------------------------------------------------------------------
def test_quantizable_layers_of_tiny_llama(tiny_llama) -> None:
    layers = engine.quantizable_layers(tiny_llama)
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert ("model.layers.0.self_attn.k_proj", 64, 32) in layers
    assert ("model.layers.1.mlp.down_proj", 128, 64) in layers
    assert all(n.startswith("model.layers.") for n, *_ in layers)
    assert ("lm_head", 64, 512) in engine.quantizable_layers(tiny_llama, include_lm_head=True)


def test_find_blocks_names_where_it_looked() -> None:
    with pytest.raises(ValueError, match=r"cannot find the decoder blocks of Sequential.*model\.layers"):
        engine.find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_engine_run_quantizes_every_planned_layer(tiny_llama) -> None:
    model = tiny_llama
    untouched = "model.layers.1.mlp.down_proj"
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=2, group_size=32), {untouched: {"bits": 16}})
    assert len(plan.layers) == 13
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    report = engine.run(model, plan, ids, None, TuneOptions(iters=5, batch_size=2, show_progress=False))

    assert set(report.quantized) == set(plan.layers)
    for name, qt in report.quantized.items():
        assert qt.spec == plan.layers[name]
        assert torch.equal(model.get_submodule(name).weight, dequantize(qt)), name
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    norms = {n for n in changed if n.startswith("model.layers.") and "layernorm" in n}  # tuned with the rounding
    assert changed - norms == {f"{n}.weight" for n in plan.layers}  # nothing else (embeddings, head, skipped layer)
    assert len(report.block_losses) == 2
    for init, final in report.block_losses:
        assert init is not None and final is not None and final <= init
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("quanted_input", [True, False])
def test_each_block_tunes_on_the_stream_the_option_names(tiny_llama_factory, monkeypatch, quanted_input) -> None:
    """enable_quanted_input: block 1 tunes on block 0's quantized outputs (the default), or with False on the fp
    model's own block-1 inputs, so it fits its own error only (the reference's disable_quanted_input)."""
    model = tiny_llama_factory()
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    fp_seen: list[torch.Tensor] = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kw: fp_seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model(ids)
    hook.remove()
    tuned_on: dict[int, torch.Tensor] = {}
    real = engine._tune_one_block

    def spy(block, layers, importance, prefix, plan, q_in, fp_out, options, bar, i):
        tuned_on[i] = q_in.hidden.detach().clone()
        return real(block, layers, importance, prefix, plan, q_in, fp_out, options, bar, i)

    monkeypatch.setattr(engine, "_tune_one_block", spy)
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=2, group_size=32), {})
    options = TuneOptions(iters=3, batch_size=2, show_progress=False, amp=False, enable_quanted_input=quanted_input)
    engine.run(model, plan, ids, None, options)
    gap = (tuned_on[1].reshape(fp_seen[0].shape) - fp_seen[0]).abs().max().item()
    if quanted_input:
        assert gap > 1e-2  # 2-bit block 0 moved its outputs
    else:
        assert gap < 1e-5


def test_rtn_only_is_plain_rtn(tiny_llama) -> None:
    plan = resolve_plan(engine.quantizable_layers(tiny_llama), LayerSpec(bits=4, group_size=32, sym=False))
    fp = {n: tiny_llama.get_submodule(n).weight.clone() for n in plan.layers}
    report = engine.rtn_only(tiny_llama, plan, TuneOptions())
    for name in plan.layers:
        expected = dequantize(quantize(fp[name], plan.layers[name]))
        assert torch.equal(tiny_llama.get_submodule(name).weight, expected)
        assert torch.equal(dequantize(report.quantized[name]), expected)


class _ServedLinear(nn.Module):
    """What a packed fp layer computes: the input quantized as the scheme says, times the dequantized weight."""

    def __init__(self, linear: nn.Linear, q: object):
        super().__init__()
        from signround.quant.dispatch import dequantize_weight

        self.q, self.weight = q, dequantize_weight(q, torch.float32)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from signround.quant.fp_tensor import quantize_input

        return F.linear(quantize_input(x, self.q.spec, self.q.input_scale), self.weight, self.bias)


def test_without_tuning_the_stream_fed_forward_has_its_activations_quantized(tiny_llama_factory) -> None:
    """iters=0 with a scheme that quantizes activations (MXFP4): the block's outputs handed to the next block are
    those of the served layers (inputs quantized too), not of the dequantized weights alone."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=4, seq=16)
    spec = LayerSpec(**_scheme("MXFP4"))
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    layers = {n: (m, spec, LayerStart()) for n, m in linears.items()}
    result = tune_block(block, layers, inputs, targets, TuneOptions(iters=0, batch_size=2))
    assert result.outputs is not None
    weights_only = run_block(block, inputs, 2)  # the block now holds the dequantized weights
    served = copy.deepcopy(block)
    for name, linear in linears.items():
        served.set_submodule(name, _ServedLinear(linear, result.quantized[name]))
    expected = run_block(served, inputs, 2)
    torch.testing.assert_close(result.outputs, expected, rtol=0, atol=0)
    assert not torch.equal(result.outputs, weights_only)


def test_a_static_schemes_calibrated_input_scale_is_what_the_loop_tunes_against(tiny_llama_factory) -> None:
    """FP8_STATIC: the input scale the engine calibrates before tuning is the one the loop's forwards, its judging
    and its result use (not a per-batch stand-in): a scale that saturates every input changes the start's loss."""
    _model, block, inputs, targets = _block_setup(tiny_llama_factory, n=4, seq=16)
    spec = LayerSpec(**_scheme("FP8_STATIC"))
    name = "mlp.down_proj"
    linear = block.get_submodule(name)
    options = TuneOptions(iters=2, batch_size=2, show_progress=False, amp=False)
    losses, scales = [], []
    for scale in (torch.tensor(1.0), torch.tensor(1e-4)):  # 1e-4: every input saturates at 448 * 1e-4
        b = copy.deepcopy(block)
        layer = b.get_submodule(name)
        with torch.enable_grad():
            result = tune_block(b, {name: (layer, spec, LayerStart(input_scale=scale))}, inputs, targets, options)
        losses.append(result.init_loss)
        scales.append(result.quantized[name].input_scale)
    assert all(torch.equal(s, t) for s, t in zip(scales, (torch.tensor(1.0), torch.tensor(1e-4)), strict=True))
    assert losses[1] > 10 * losses[0]
    assert torch.equal(linear.weight, block.get_submodule(name).weight)  # the copies were tuned, not the block


def _scheme(name: str) -> dict:
    from signround.schemes import scheme_fields

    return scheme_fields(name)


@pytest.mark.parametrize("spec_fields", [{"scheme": "MXFP4"}, {"data_type": "gguf:q4_0"}])
def test_a_kept_step_is_the_result_of_the_parameters_its_forward_used(spec_fields: dict) -> None:
    """GGUF and fp layers keep their best step by quantizing the live parameters when the loop keeps it (before
    the optimizer moves them): what is kept must not follow the parameters afterwards."""
    from signround.quant.dispatch import dequantize_weight
    from signround.schemes import gguf_spec_fields

    spec = LayerSpec(**(_scheme("MXFP4") if "scheme" in spec_fields else gguf_spec_fields("q4_0")))
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    tl = LayerStart().tunable(linear, spec, torch.float16)
    with torch.no_grad():
        tl.v.uniform_(-0.5, 0.5)
    tl(torch.randn(3, 64))
    expected = dequantize_weight(tl.quantized(), torch.float32)
    kept = tl.last.kept()
    with torch.no_grad():
        tl.v.uniform_(-0.5, 0.5)  # the optimizer's step
        tl.alpha.mul_(0.5)
    assert torch.equal(dequantize_weight(kept.quantized(torch.float16), torch.float32), expected)
    assert not torch.equal(dequantize_weight(tl.quantized(), torch.float32), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host-device synchronisations exist only there")
@pytest.mark.parametrize("compile_loop", [False, True])
def test_on_a_gpu_a_tuning_step_synchronises_with_the_host_once(compile_loop, monkeypatch) -> None:
    """The loss's ``.item()`` is the loop's one synchronisation per step: batch indices come drawn up front and the
    signed step's learning rate is refilled on the device (the H200 profile counted about 12 per step before)."""
    import warnings

    from tiny_families import make_tiny_llama

    from signround.quant import fused

    if compile_loop:  # the tiny layers take the fused kernels too (the step with its learning rate inside)
        monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)

    def syncs(iters: int) -> int:
        model = make_tiny_llama()
        plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=4, group_size=32))
        ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
        options = TuneOptions(
            iters=iters, batch_size=2, show_progress=False, device="cuda", enable_torch_compile=compile_loop
        )
        engine.run(model, plan, ids, None, options)  # warm: compiled kernels and caches exist before counting
        model = make_tiny_llama()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.run(model, plan, ids, None, options)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    blocks = 2  # make_tiny_llama's
    assert syncs(12) - syncs(4) <= 8 * blocks  # at most one more per extra step of each block
