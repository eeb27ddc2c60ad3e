"""The tuning objectives: squared error for hidden states, KL divergence of the softmax for logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import engine
from signround.tuning.block import TuneOptions
from signround.tuning.objectives import (
    KL,
    MSE,
    OBJECTIVES,
    RELATIVE_MSE,
    RELATIVE_MSE_WITHOUT_OUTLIERS,
    block_objective,
)


def test_mse_is_torchs_mean_squared_error_and_sums_over_elements() -> None:
    out, target = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    assert torch.equal(MSE.loss(out, target, "mean"), F.mse_loss(out, target))
    assert MSE.loss(out, target, "sum").item() / MSE.units(out) == pytest.approx(F.mse_loss(out, target).item())


def test_kl_is_the_mean_over_tokens_of_the_next_token_divergence() -> None:
    out, target = torch.randn(4, 6, 11), torch.randn(4, 6, 11)
    p, q = target.log_softmax(-1), out.log_softmax(-1)
    per_token = (p.exp() * (p - q)).sum(-1)
    assert KL.units(out) == 24
    assert KL.loss(out, target, "mean").item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert KL.loss(out, target, "sum").item() == pytest.approx(per_token.sum().item(), rel=1e-5)


def _autograd_kl(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The KL as autograd would build it (the head's objective before it computed its own gradient)."""
    return F.kl_div(out.float().log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kls_own_gradient_is_autograds_over_chunks_of_tokens(monkeypatch, dtype) -> None:
    """Value and gradient equal autograd's through log_softmax, also when the tokens do not fill the last chunk;
    the gradient comes back in the logits' dtype."""
    monkeypatch.setattr("signround.tuning.objectives.KL_ROWS_PER_CHUNK", 4)
    torch.manual_seed(0)
    target = 3 * torch.randn(3, 5, 50)
    base = (target + torch.randn_like(target)).to(dtype)
    ours, ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss = KL.loss(ours, target, "mean")
    (_autograd_kl(ref, target) / 15).backward()
    loss.backward()
    assert loss.item() == pytest.approx(_autograd_kl(base, target).item() / 15, rel=1e-5)
    assert ours.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), rtol=0, atol=tol * ref.grad.abs().max().item())
    assert KL.loss(base, target, "sum").item() == pytest.approx(_autograd_kl(base, target).item(), rel=1e-5)


def test_the_kl_saves_nothing_for_its_backward_but_the_gradient() -> None:
    """No float32 log-softmax or probabilities of a tokens x vocabulary batch are kept for the backward (autograd's
    version of the same loss keeps several)."""
    target = torch.randn(8, 100)
    out = torch.randn(8, 100, requires_grad=True)

    def saved_by(loss_fn) -> int:
        saved: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            loss_fn(out, target)
        return sum(1 for shape in saved if shape.numel() >= out.numel())

    assert saved_by(lambda o, t: KL.loss(o, t, "mean")) == 0
    assert saved_by(_autograd_kl) >= 2


def test_kl_ignores_what_the_softmax_ignores_and_mse_does_not() -> None:
    """A per-token shift of the logits changes no probability: KL sees no error, the squared error does."""
    target = torch.randn(2, 3, 9)
    shifted = target + torch.randn(2, 3, 1)
    assert KL.loss(shifted, target, "mean").item() == pytest.approx(0.0, abs=1e-6)
    assert MSE.loss(shifted, target, "mean").item() > 0.1
    assert set(OBJECTIVES) == {"mse", "relative-mse", "kl", "relative-mse-without-outliers"}


def test_the_blocks_loss_weighs_each_tokens_error_relative_to_its_target() -> None:
    """A token 1000 times larger than the others (an attention sink) with the same relative error counts as much as
    any other token, where in the plain squared error it would be the whole loss; sum / units is the mean."""
    torch.manual_seed(0)
    target = torch.randn(2, 8, 16)
    target[:, 0] *= 1000.0
    out = target * (1 + 0.01 * torch.randn_like(target))
    per_token = ((out - target).square().mean(-1) / target.square().mean(-1)).mean()
    assert RELATIVE_MSE.loss(out, target, "mean").item() == pytest.approx(per_token.item(), rel=1e-4)
    summed = RELATIVE_MSE.loss(out, target, "sum").item() / RELATIVE_MSE.units(out)
    assert summed == pytest.approx(per_token.item(), rel=1e-4)
    sink_share = (out - target)[:, 0].square().sum() / (out - target).square().sum()
    assert sink_share > 0.99  # what the plain squared error would chase
    relative_sink = RELATIVE_MSE.loss(out[:, :1], target[:, :1], "sum") / RELATIVE_MSE.loss(out, target, "sum")
    assert 0.02 < relative_sink.item() < 0.3  # one of 8 positions: about its share


def test_a_token_of_zero_size_does_not_divide_by_zero() -> None:
    target = torch.randn(1, 4, 8)
    target[0, 2] = 0.0
    out = target + 0.1
    loss = RELATIVE_MSE.loss(out, target, "mean")
    assert torch.isfinite(loss) and loss.item() < 1e4 * RELATIVE_MSE.loss(out[:, :2], target[:, :2], "mean").item()


def test_the_low_bit_loss_leaves_out_the_largest_differences_and_is_judged_by_the_full_error() -> None:
    """The largest 0.1 % of the relative differences get no loss and no gradient; the rest count as in the relative
    squared error, divided by every element; the judging objective is the full relative squared error."""
    torch.manual_seed(0)
    target = torch.randn(2, 50, 40)
    out = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    with torch.no_grad():
        out[0, 3, 5] += 50.0  # two outliers: 4000 elements x 0.1 % = 4 left out, these among them
        out[1, 7, 2] -= 30.0
    loss = RELATIVE_MSE_WITHOUT_OUTLIERS.loss(out, target, "mean")
    loss.backward()
    assert out.grad[0, 3, 5] == 0 and out.grad[1, 7, 2] == 0
    assert int((out.grad == 0).sum()) == 4
    scale = target.square().mean(-1, keepdim=True).rsqrt()
    diff = ((out - target) * scale).detach()
    size = diff.abs().flatten().sort().values
    assert loss.item() == pytest.approx((size[:-4] ** 2).sum().item() / diff.numel(), rel=1e-4)
    assert loss.item() < 0.1 * RELATIVE_MSE.loss(out, target, "mean").item()
    assert RELATIVE_MSE_WITHOUT_OUTLIERS.judge is RELATIVE_MSE and RELATIVE_MSE.judge is RELATIVE_MSE


def test_only_blocks_of_low_bit_integer_grids_leave_out_outliers() -> None:
    w2, w3, w4 = (LayerSpec(bits=b, group_size=32) for b in (2, 3, 4))
    assert block_objective([w2, w2]) is RELATIVE_MSE_WITHOUT_OUTLIERS
    assert block_objective([w3]) is RELATIVE_MSE
    assert block_objective([w2, w4]) is RELATIVE_MSE  # one layer at 4 bits: the block's error is not the low-bit kind
    assert block_objective([w4]) is RELATIVE_MSE
    q2_k = LayerSpec(bits=2, group_size=16, sym=False, data_type="gguf:q2_k")
    assert block_objective([q2_k]) is RELATIVE_MSE


@pytest.mark.parametrize(("bits", "expected"), [(2, "relative-mse-without-outliers"), (4, "relative-mse")])
def test_the_engine_tunes_each_block_on_its_objective(tiny_llama, monkeypatch, bits, expected) -> None:
    seen: list[str] = []
    real = engine.tune_block
    monkeypatch.setattr(
        engine,
        "tune_block",
        lambda *a, objective, **k: seen.append(objective.name) or real(*a, objective=objective, **k),
    )
    plan = resolve_plan(engine.quantizable_layers(tiny_llama), LayerSpec(bits=bits, group_size=32))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    engine.run(tiny_llama, plan, ids, None, TuneOptions(iters=2, batch_size=2, show_progress=False))
    assert seen and set(seen) == {expected}
