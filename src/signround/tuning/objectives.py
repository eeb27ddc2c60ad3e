"""What a tuned stage's outputs are compared to their full-precision targets by.

A decoder block's outputs are hidden states: every coordinate matters to the next block alike, so the loss is
their mean squared error (SignRound's objective).  The output head's outputs are logits: what the model does with
them is a softmax, which ignores a shift of a token's logits and weighs each vocabulary entry by its probability,
so the head is better tuned on the KL divergence of the next-token distributions (the evaluation's own measure)
than on the squared error of all ``vocab`` logits alike (measured: docs/benchmarks.md, "The output head").

At 2 bits a minibatch's squared error can be driven by a few large coordinates (the residual stream's outlier
features), which the signed steps then chase; leaving the largest 0.1 % of each minibatch's differences out of
the loop's loss lets them follow the bulk (what the reference's ``enable_alg_ext`` does below 4 bits; measured:
docs/benchmarks.md, "W2: the loop's loss without outliers").  The judging that guards "never worse than the
start" still uses the full squared error over the whole calibration set.
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
    loop's minibatch loss) or "sum" (the whole-set judging, divided by the summed ``units`` afterwards)."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    units: Callable[[torch.Tensor], int]
    judged_by: Objective | None = None  # the whole-set judging's objective when not this one

    @property
    def judge(self) -> Objective:
        return self.judged_by or self


def _mse(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.mse_loss(out, target, reduction=reduction)


def _kl(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum (or mean over tokens) of KL(p_target || p_out) of the softmax over the last dimension."""
    kl = F.kl_div(out.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum")
    return kl / _tokens(out) if reduction == "mean" else kl


def _tokens(out: torch.Tensor) -> int:
    return out.numel() // out.shape[-1]


OUTLIER_FRACTION = 1e-3  # of a minibatch's output coordinates, left out of the low-bit loop's loss


def _mse_without_outliers(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """The squared error with the largest ``OUTLIER_FRACTION`` of ``|out - target|`` set to zero (still divided
    by every element for "mean")."""
    diff = out - target
    size = diff.detach().abs()
    k = max(1, int(size.numel() * OUTLIER_FRACTION))
    kept = size < size.flatten().topk(k).values[-1]
    squares = (diff * kept).square()
    return squares.mean() if reduction == "mean" else squares.sum()


MSE = Objective("mse", _mse, torch.Tensor.numel)
KL = Objective("kl", _kl, _tokens)
MSE_WITHOUT_OUTLIERS = Objective("mse-without-outliers", _mse_without_outliers, torch.Tensor.numel, judged_by=MSE)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MSE, KL, MSE_WITHOUT_OUTLIERS)}

# Integer grids of fewer bits than this tune on MSE_WITHOUT_OUTLIERS: at W2G32 it lowered ppl and KL on each of
# three seeds; at W3G32 it was a wash (ppl 1 % lower, KL 0.3 % higher) for ~8 % more loop time, so W3 keeps the MSE
OUTLIER_LOSS_BELOW_BITS = 3


def block_objective(specs: Iterable[LayerSpec]) -> Objective:
    """A block's loop objective: without outliers where every tuned layer is an integer grid below
    :data:`OUTLIER_LOSS_BELOW_BITS` bits, else the squared error."""
    specs = list(specs)
    low_int = specs and all(s.data_type == "int" and s.bits < OUTLIER_LOSS_BELOW_BITS for s in specs)
    return MSE_WITHOUT_OUTLIERS if low_int else MSE
