"""The output head (``quant_lm_head=True``) tuned like a block: SignRound toward the full-precision next-token
distributions (the KL divergence of their softmax; blocks use the squared error of hidden states).

The head sees the final norm of the quantized stream and should reproduce the logits the full-precision model
computes from its own stream, so its rounding corrects, as every block's does, the error accumulated upstream.
Norm and head act on each token alone, so the walk's ``[N, T, H]`` streams are flattened to one sample per token
and batched by tokens: the batch is sized so that one batch's logits (tokens x vocabulary) stay within
:data:`LOGIT_BYTES`, and the targets are computed per batch from the normalised full-precision stream instead of
being cached (the whole set's logits would be ``N x T x vocab`` floats).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..schemes import LayerSpec
from .block import BlockResult, LayerStart, TuneOptions, tune_block
from .inputs import BlockInputs
from .objectives import KL, Objective

# One batch's logits in float32 at most this large (the loss also holds their target and gradient alike).
LOGIT_BYTES = 512 * 2**20


class _HeadStage(nn.Module):
    """The head as a one-layer "block": normalised hidden states in, logits out."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor, **_unused: object) -> torch.Tensor:
        return self.head(hidden)


class _LogitTargets:
    """The full-precision logits of a batch of tokens, computed when the loop asks for them (``targets[idx]``)."""

    def __init__(self, normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        self.normed, self.weight, self.bias = normed, weight, bias
        self.device = normed.device

    @torch.no_grad()
    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.normed[idx.to(self.device)].to(self.weight.device, self.weight.dtype)
        return F.linear(x, self.weight, self.bias).float()


def tokens_per_batch(options: TuneOptions, seqlen: int, vocab: int) -> int:
    """The blocks' batch (``batch_size`` samples of ``seqlen`` tokens), fewer tokens where their logits would
    exceed :data:`LOGIT_BYTES`."""
    return max(1, min(options.batch_size * seqlen, LOGIT_BYTES // (4 * vocab)))


def tune_head(
    head: nn.Linear,
    spec: LayerSpec,
    start: LayerStart,
    q_normed: torch.Tensor,
    fp_normed: torch.Tensor,
    options: TuneOptions,
    progress: Callable[[int, float], None] | None = None,
    objective: Objective = KL,
) -> BlockResult:
    """Tune ``head`` from ``start`` so that it maps the quantized stream's normalised hidden states ``q_normed``
    (``[N, T, H]``) onto the logits of ``fp_normed`` through the unquantized head: by default it minimises the KL
    divergence of the next-token distributions (tuning.objectives).  The weight is left set to the kept result,
    dequantized; the result holds no outputs."""
    hidden = head.in_features
    tokens = tokens_per_batch(options, q_normed.shape[1], head.out_features)
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    targets = _LogitTargets(fp_normed.reshape(-1, 1, hidden), weight, bias)
    inputs = BlockInputs(q_normed.reshape(-1, 1, hidden).to(head.weight.device))
    options = dataclasses.replace(options, batch_size=tokens, write_back=True)
    stage = _HeadStage(head)
    with torch.enable_grad():
        return tune_block(
            stage, {"head": (head, spec, start)}, inputs, targets, options, progress, keep_outputs=False,
            objective=objective,
        )  # fmt: skip
