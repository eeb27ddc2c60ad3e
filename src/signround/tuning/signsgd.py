"""Signed gradient descent and its learning-rate schedule, as SignRound uses them."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SignSGD(torch.optim.Optimizer):
    """``p <- p - lr * sign(grad)``: every parameter moves by the same step, whatever its gradient's scale.

    That suits the bounded rounding offsets (|V| <= 0.5) and clipping factors: with ``lr <= 1/iters`` and the
    linear decay the whole schedule can move a value by at most about half its range.
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


SHORT_RUN_ITERS = 200  # below this many iterations a run keeps the 200-iteration step 1/200 = 5e-3
# Below 1000 iterations a run moves the rounding offsets no further in total than 50 steps of 5e-3: lr = this / iters
TOTAL_STEP = 0.25
LONG_RUN_ITERS = 1000  # from here on the reference's rules: 1/iters, 2/iters at <= 3 bits


def default_lr(iters: int, bits: int) -> float:
    """The automatic learning rate: ``min(5e-3, 0.25/iters)`` below 1000 iterations; from 1000 iterations
    ``1/iters``, ``2/iters`` at <= 3 bits.

    The reference's ``1/iters`` grows the step as the run shortens (2e-2 at 50), and the step is what hurts there:
    on SmolLM2 at iters 50 the reference's own light-recipe step 5e-3 gives lower perplexity and KL than 2e-2 at
    W4, W3 and W2 alike, and better tuned GGUF files at every type measured (docs/benchmarks.md, "Learning rate at
    iters 50").  So short runs keep 5e-3.  Longer runs take smaller steps, so that the whole schedule moves the
    offsets as far as 50 steps of 5e-3 do (1.25e-3 at the default 200): more, smaller steps on the same calibration
    tokens instead of four times the movement.  At iters 200 that gave lower perplexity and KL than 1/200 at W4,
    W3 and W2 on SmolLM2 over several calibration orders (docs/benchmarks.md, "iters 200").
    """
    if iters <= 0:
        return 0.0
    if iters >= LONG_RUN_ITERS:
        return (2.0 if bits <= 3 else 1.0) / iters
    return min(1.0 / SHORT_RUN_ITERS, TOTAL_STEP / iters)


def learning_rates(lr: float | None, minmax_lr: float | None, iters: int, bits: int) -> tuple[float, float]:
    """``(lr, minmax_lr)`` as a run uses them: an unset ``lr`` is :func:`default_lr`, an unset ``minmax_lr`` is
    ``lr``.  One rule for the tuning loop and for what a checkpoint records about the run."""
    lr = lr if lr is not None else default_lr(iters, bits)
    return lr, (minmax_lr if minmax_lr is not None else lr)


def linear_decay(optimizer: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate decayed linearly from its initial value to 0 over ``iters`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(iters, 1)))
