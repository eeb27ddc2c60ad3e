"""What a tuned stage's outputs are compared to their full-precision targets by.

A decoder block's outputs are hidden states: every coordinate matters to the next block alike, so the loss is
their mean squared error (SignRound's objective).  The output head's outputs are logits: what the model does with
them is a softmax, which ignores a shift of a token's logits and weighs each vocabulary entry by its probability,
so the head is better tuned on the KL divergence of the next-token distributions (the evaluation's own measure)
than on the squared error of all ``vocab`` logits alike (measured: docs/benchmarks.md, "The output head").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Objective:
    """A loss and the unit it averages over: ``loss(out, target, reduction)`` with ``reduction`` "mean" (the
    loop's minibatch loss) or "sum" (the whole-set judging, divided by the summed ``units`` afterwards)."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
    units: Callable[[torch.Tensor], int]


def _mse(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    return F.mse_loss(out, target, reduction=reduction)


def _kl(out: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum (or mean over tokens) of KL(p_target || p_out) of the softmax over the last dimension."""
    kl = F.kl_div(out.log_softmax(-1), target.log_softmax(-1), log_target=True, reduction="sum")
    return kl / _tokens(out) if reduction == "mean" else kl


def _tokens(out: torch.Tensor) -> int:
    return out.numel() // out.shape[-1]


MSE = Objective("mse", _mse, torch.Tensor.numel)
KL = Objective("kl", _kl, _tokens)

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MSE, KL)}
