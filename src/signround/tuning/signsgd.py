"""Signed gradient descent and its learning-rate schedule, as SignRound uses them."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SignSGD(torch.optim.Optimizer):
    """``p <- p - lr * sign(grad)``: every parameter moves by the same step, whatever its gradient's scale.

    That suits the bounded rounding offsets (|V| <= 0.5) and clipping factors: with ``lr = 1/iters`` the
    whole schedule can move a value by at most about half its range.
    """

    def __init__(self, params: Iterable, lr: float):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # In place on the gradients (they are consumed here): one multi-tensor op per step, no temporaries.
            grads = [p.grad for p in params]
            torch._foreach_sign_(grads)
            torch._foreach_add_(params, grads, alpha=-group["lr"])
        return None


def default_lr(iters: int, bits: int) -> float:
    """The reference's automatic learning rate: ``1/iters`` (``2/iters`` for long runs at <= 3 bits)."""
    if iters <= 0:
        return 0.0
    return (2.0 if iters >= 1000 and bits <= 3 else 1.0) / iters


def linear_decay(optimizer: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate decayed linearly from its initial value to 0 over ``iters`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(iters, 1)))
