"""What a tuned stage's outputs are compared to their full-precision targets by.

A decoder block's outputs are hidden states, and what the next block does with a token's hidden state first is
an RMSNorm / LayerNorm: it divides the token by its own size.  So each token's squared error counts relative to
its target's mean square (SignRound's mean squared error, weighted per token).  The plain squared error is
decided by a few tokens of huge norm instead: in SmolLM2-135M the first position of every sequence (an attention
sink) carries 98 % of block 20's output energy, and tuning on it fits those tokens at the cost of all the others
(measured: docs/benchmarks.md, "The blocks' loss, token by token").  The output head's outputs are logits: what
the model does with them is a softmax, which ignores a shift of a token's logits and weighs each vocabulary entry
by its probability, so the head is better tuned on the KL divergence of the next-token distributions (the
evaluation's own measure) than on the squared error of all ``vocab`` logits alike (measured: docs/benchmarks.md,
"The output head").

At 2 bits a minibatch's error can still be driven by a few large coordinates (the residual stream's outlier
features), which the signed steps then chase; leaving the largest 0.1 % of each minibatch's (relative)
differences out of the loop's loss lets them follow the bulk (what the reference's ``enable_alg_ext`` does below 4
bits; measured: docs/benchmarks.md, "W2: the loop's loss without outliers").  The judging that guards "never worse
than the start" uses the full relative error over the whole calibration set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schemes import LayerSpec


@dataclass(frozen=True)
class Objective:
    """A loss and the unit it averages over: ``loss(out, target, reduction)`` with ``reduction`` "mean" (the
    loop's minibatch loss) or "sum" (the whole-set judging, divided by the summed ``units`` afterwards); ``out`` in
    the loop's dtype (the loss computes in float32), ``target`` float32."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    units: Callable[[torch.Tensor], int]
    judged_by: Objective | None = None  # the whole-set judging's objective when not this one

    @property
    def judge(self) -> Objective:
        return self.judged_by or self


def _mse(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.mse_loss(out.float(), target, reduction=reduction)


# Rows (tokens) of logits whose softmax temporaries exist at once in the KL: 256 x a 49k vocabulary is 50 MB each
KL_ROWS_PER_CHUNK = 256


class _KLDivergence(torch.autograd.Function):
    """Sum over tokens of KL(p_target || softmax(out)), times ``scale``, with its gradient computed in the forward.

    The gradient of the KL with respect to the logits is ``softmax(out) - p_target`` per token: computing it chunk
    by chunk of tokens while the loss is summed keeps one logits-sized tensor (the gradient, in ``out``'s dtype)
    instead of the float32 log-softmaxes, exponentials and products that autograd would save or build for a
    ``tokens x vocabulary`` batch (about 1.5 GB more at SmolLM2's 49k vocabulary and 2048 tokens).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        vocab = out.shape[-1]
        rows_out, rows_target = out.detach().reshape(-1, vocab), target.reshape(-1, vocab)
        grad = torch.empty_like(rows_out) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=out.device)
        for start in range(0, rows_out.shape[0], KL_ROWS_PER_CHUNK):
            rows = slice(start, start + KL_ROWS_PER_CHUNK)
            log_q = rows_out[rows].float().log_softmax(-1)
            log_p = rows_target[rows].float().log_softmax(-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if grad is not None:
                grad[rows] = log_q.exp_().sub_(p).mul_(scale)
        ctx.grad = None if grad is None else grad.view(out.shape)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        grad, ctx.grad = ctx.grad, None
        return grad * grad_loss.to(grad.dtype), None, None


def _kl(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum (or mean over tokens) of KL(p_target || p_out) of the softmax over the last dimension."""
    return _KLDivergence.apply(out, target, 1.0 / _tokens(out) if reduction == "mean" else 1.0)


def _tokens(out: torch.Tensor) -> int:
    return out.numel() // out.shape[-1]


# A token's mean square is floored at this fraction of the batch's median token: a token of (near) zero size must
# not turn the relative error into a division by zero (the median, as a few huge tokens would lift a mean)
POWER_FLOOR = 1e-4


def _per_token_scale(target: torch.Tensor) -> torch.Tensor:
    """``1 / rms`` of each target token (last dimension), the factor that makes a token's error relative."""
    power = target.square().mean(-1, keepdim=True)
    return power.clamp_min(POWER_FLOOR * power.flatten().median()).rsqrt()


def _relative_mse(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Each token's squared error divided by its target's mean square, over every element."""
    scale = _per_token_scale(target)
    return F.mse_loss(out.float() * scale, target * scale, reduction=reduction)


OUTLIER_FRACTION = 1e-3  # of a minibatch's output coordinates, left out of the low-bit loop's loss


def _relative_mse_without_outliers(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """:func:`_relative_mse` with the largest ``OUTLIER_FRACTION`` of the relative differences set to zero (still
    divided by every element for "mean")."""
    scale = _per_token_scale(target)
    diff = out.float() * scale - target * scale
    size = diff.detach().abs()
    k = max(1, int(size.numel() * OUTLIER_FRACTION))
    kept = size < size.flatten().topk(k).values[-1]
    squares = (diff * kept).square()
    return squares.mean() if reduction == "mean" else squares.sum()


MSE = Objective("mse", _mse, torch.Tensor.numel)
RELATIVE_MSE = Objective("relative-mse", _relative_mse, torch.Tensor.numel)
KL = Objective("kl", _kl, _tokens)
RELATIVE_MSE_WITHOUT_OUTLIERS = Objective(
    "relative-mse-without-outliers", _relative_mse_without_outliers, torch.Tensor.numel, judged_by=RELATIVE_MSE
)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MSE, RELATIVE_MSE, KL, RELATIVE_MSE_WITHOUT_OUTLIERS)}

# Integer grids of fewer bits than this leave the outliers out of the loop's loss: at W2G32 it lowered ppl and KL
# on each of three seeds; at W3G32 it was a wash (ppl 1 % lower, KL 0.3 % higher) for ~8 % more loop time
OUTLIER_LOSS_BELOW_BITS = 3


def block_objective(specs: Iterable[LayerSpec]) -> Objective:
    """A decoder block's loop objective: the relative squared error, without its outliers where every tuned layer
    is an integer grid below :data:`OUTLIER_LOSS_BELOW_BITS` bits."""
    specs = list(specs)
    low_int = specs and all(s.data_type == "int" and s.bits < OUTLIER_LOSS_BELOW_BITS for s in specs)
    return RELATIVE_MSE_WITHOUT_OUTLIERS if low_int else RELATIVE_MSE
