"""The tuning objectives: squared error for hidden states, KL divergence of the softmax for logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from signround.tuning.objectives import KL, MSE, OBJECTIVES


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


def test_kl_ignores_what_the_softmax_ignores_and_mse_does_not() -> None:
    """A per-token shift of the logits changes no probability: KL sees no error, the squared error does."""
    target = torch.randn(2, 3, 9)
    shifted = target + torch.randn(2, 3, 1)
    assert KL.loss(shifted, target, "mean").item() == pytest.approx(0.0, abs=1e-6)
    assert MSE.loss(shifted, target, "mean").item() > 0.1
    assert set(OBJECTIVES) == {"mse", "kl"}
