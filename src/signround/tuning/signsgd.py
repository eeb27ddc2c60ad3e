"""Signed gradient descent and its learning-rate schedule, as SignRound uses them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


SHORT_RUN_ITERS = 50  # shorter runs take the 50-iteration step instead of growing it further
# Below 1000 iterations the whole schedule moves the rounding offsets this far (lr = this / iters): 0.25, and 0.5 on
# the integer grids at <= 2 bits (measured there; the GGUF 2-bit type keeps 0.25, where its rows were measured).
TOTAL_MOVEMENT = 0.25
LOW_BIT_TOTAL_MOVEMENT = 0.5
LONG_RUN_ITERS = 1000  # from here on the reference's rules: 1/iters, 2/iters at <= 3 bits


def default_lr(iters: int, bits: int, data_type: str = "int") -> float:
    """The automatic learning rate below 1000 iterations: ``0.25 / max(iters, 50)`` (5e-3 at iters 50, 1.25e-3 at
    the default 200), on the integer grids at <= 2 bits ``0.5 / max(iters, 50)`` (1e-2, 2.5e-3); from 1000
    iterations ``1/iters``, ``2/iters`` at <= 3 bits.

    The reference's ``1/iters`` grows the step as the run shortens (2e-2 at 50), and the step is what hurts there:
    on SmolLM2 at iters 50 the reference's own light-recipe step 5e-3 gives lower perplexity and KL than 2e-2 at
    W4 and W3, and better tuned GGUF files at every type measured (docs/benchmarks.md, "Learning rate at iters
    50").  Longer runs take smaller steps, so that the whole schedule moves the offsets as far as 50 steps do: more,
    smaller steps on the same calibration tokens instead of more movement.  At iters 200 that gave lower perplexity
    and KL than 1/200 at W4 and W3 over several calibration orders (docs/benchmarks.md, "iters 200").  At 2 bits,
    on the integer grids with the clipping kept at its searched start, twice that movement measured better: iters 50
    at 1e-2 against 5e-3 lowered perplexity and KL over three calibration orders, and iters 200 at 2.5e-3 was level
    with 1.25e-3 (docs/benchmarks.md, "Learning rate at iters 50")."""
    if iters <= 0:
        return 0.0
    if iters >= LONG_RUN_ITERS:
        return (2.0 if bits <= 3 else 1.0) / iters
    total = LOW_BIT_TOTAL_MOVEMENT if bits <= 2 and data_type == "int" else TOTAL_MOVEMENT
    return total / max(iters, SHORT_RUN_ITERS)


def run_learning_rates(
    lr: float | None, minmax_lr: float | None, iters: int, specs: Iterable[Any]
) -> tuple[float, float]:
    """``(lr, minmax_lr)`` as a run whose layers have the quantization ``specs`` (``bits`` / ``data_type``) uses
    them: an unset ``lr`` is :func:`default_lr` of its narrowest layer, for every block; an unset ``minmax_lr`` is
    ``lr``.

    One step per run, as the reference takes, so the step a checkpoint records is the step every block moved by;
    a 4-bit run with some 2-bit layers takes the 2-bit step, which at 4 bits measured level in perplexity and lower
    in KL (docs/benchmarks.md, "Learning rate at iters 50").  At equal width an integer layer counts as narrower
    than a GGUF one (its larger step)."""
    narrowest = min(specs, key=lambda spec: (spec.bits, spec.data_type != "int"), default=None)
    if narrowest is None:
        raise ValueError("no quantized layer to take the learning rate from")
    lr = lr if lr is not None else default_lr(iters, narrowest.bits, narrowest.data_type)
    return lr, (minmax_lr if minmax_lr is not None else lr)


def linear_decay(optimizer: torch.optim.Optimizer, iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate decayed linearly from its initial value to 0 over ``iters`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max(iters, 1)))
