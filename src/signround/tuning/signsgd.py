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


SHORT_RUN_ITERS = 200  # the reference's default recipe; shorter runs keep its step (1/200 = 5e-3)
# At <= 2 bits a run moves the rounding offsets no further in total than 50 steps of 5e-3 do: lr = this / iters
LOW_BIT_TOTAL_STEP = 0.25


def default_lr(iters: int, bits: int) -> float:
    """The automatic learning rate: ``1/max(iters, 200)``; at <= 2 bits ``min(5e-3, 0.25/iters)`` below 1000
    iterations; ``2/iters`` for runs of 1000+ iterations at <= 3 bits.

    From 200 iterations up ``1/iters`` is the reference's rule.  Below, its ``1/iters`` grows the step as the run
    shortens (2e-2 at 50), and the step is what hurts there: on SmolLM2 at iters 50 the reference's own light-recipe
    step 5e-3 gives lower perplexity and KL than 2e-2 at W4, W3 and W2 alike, and better tuned GGUF files at every
    type measured (docs/benchmarks.md, "Learning rate at iters 50" and the GGUF table).  So short runs keep the
    200-iteration step instead of taking larger ones.  At 2 bits longer runs take smaller steps instead: W2G32 at
    iters 200 with 1.25e-3 (the total movement of iters 50 at 5e-3) gave lower perplexity and KL than 5e-3 in
    each of three measured runs, two CPUs and two calibration orders (docs/benchmarks.md, "iters 200").
    """
    if iters <= 0:
        return 0.0
    if iters >= 1000 and bits <= 3:
        return 2.0 / iters
    if bits <= 2:
        return min(1.0 / SHORT_RUN_ITERS, LOW_BIT_TOTAL_STEP / iters)
    return 1.0 / max(iters, SHORT_RUN_ITERS)


def learning_rates(lr: float | None, minmax_lr: float | None, iters: int, bits: int) -> tuple[float, float]:
    """``(lr, minmax_lr)`` as a run uses them: an unset ``lr`` is :func:`default_lr`, an unset ``minmax_lr`` is
    ``lr``.  One rule for the tuning loop and for what a checkpoint records about the run."""
    lr = lr if lr is not None else default_lr(iters, bits)
    return lr, (minmax_lr if minmax_lr is not None else lr)


def linear_decay(optimizer: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate decayed linearly from its initial value to 0 over ``iters`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(iters, 1)))
