"""SignRound on the floating-point grids (MXFP4 / MXFP8, NVFP4, FP8): a Linear computing
``quantize_input(x) @ fake_quant(W; v, alpha, beta)^T``.

The tuned values are per weight a rounding offset ``v`` (in units of the element grid's spacing at that weight, so
+-0.5 reaches the neighbouring grid point in every binade) and per scale block factors ``alpha`` / ``beta`` shrinking
the block's negative / positive extreme before its scale is computed (:class:`~signround.quant.fp.BlockedWeight`).
The forward value is bit for bit what the checkpoint dequantizes to; ``v = 0``, ``alpha = beta = 1`` is plain RTN
in the format, the starting point the loop never ends worse than.

Schemes that quantize activations (MX, NVFP4, FP8_STATIC, FP8_BLOCK) quantize this layer's input too, as the packed
layer will: the loss then measures the error the served model makes, and gradients pass straight through the
activation rounding to the layers upstream.  A static scheme's calibrated scale is attached to the result by the
engine after tuning (:func:`~signround.quant.fp_tensor.calibrated_input_scale`); until then, and when
``input_scale`` is not given, the loop uses each batch's own scale (a per-tensor amax), the closest dynamic stand-in.

Same contract as the integer and GGUF tunable layers (the block loop drives all three); like the GGUF one it keeps
a float32 view of the weight's blocks for autograd instead of int.py's fused kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fp
from ..quant.fp_tensor import FPTensor, dequantize, quantize_input, weight_format
from ..schemes import LayerSpec
from .tunable import KeptResult, TunableParameters


@dataclass
class FPStep:
    """The parameters of one forward (the live tensors: valid until the optimizer steps, so the loop calls
    :meth:`kept` before that when the step's minibatch loss is the best so far)."""

    weight: torch.Tensor
    spec: LayerSpec
    v: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    input_scale: torch.Tensor | None
    marked_codes: None = None  # nothing goes back to int.py's workspace

    def quantized(self, scale_dtype: torch.dtype | None = None) -> FPTensor:
        q = fp.quantize(self.weight, weight_format(self.spec), self.v, self.alpha, self.beta)
        return FPTensor(q, self.spec, self.input_scale)

    def kept(self) -> KeptResult:
        return KeptResult(self.quantized())


class FPTunableLinear(TunableParameters):
    """A Linear fake-quantized to a floating-point grid with trainable ``v`` (per weight) and ``alpha`` / ``beta``
    (per scale block); see the module docstring."""

    def __init__(self, linear: nn.Linear, spec: LayerSpec, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.linear, self.spec, self.input_scale = linear, spec, input_scale
        weight = linear.weight.detach()
        self.blocked = fp.BlockedWeight(weight, weight_format(spec))
        blocks = (self.blocked.grid.n_rows, self.blocked.grid.n_cols)
        self.v = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.alpha = nn.Parameter(torch.ones(blocks, dtype=torch.float32, device=weight.device))
        self.beta = nn.Parameter(torch.ones(blocks, dtype=torch.float32, device=weight.device))
        self.last: FPStep | None = None
        self._judged: FPTensor | None = None
        self.workspace = None  # the block loop sets it for int.py's layers; unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self._judged is not None:
            x = quantize_input(x, self.spec, self._judged.input_scale)
            return F.linear(x, dequantize(self._judged, x.dtype), bias)
        x = quantize_input(x, self.spec, self.input_scale)
        w_hat = self.blocked.fake_quant(self.v, self.alpha, self.beta)
        self.last = FPStep(
            self.linear.weight.detach(), self.spec, self.v.detach(), self.alpha.detach(), self.beta.detach(),
            self.input_scale,
        )  # fmt: skip
        return F.linear(x, w_hat.to(x.dtype), bias)

    @torch.no_grad()
    def start(self) -> FPTensor:
        """Round to nearest in the format (``v = 0``, full block ranges)."""
        return FPTensor(self.blocked.quantize(), self.spec, self.input_scale)

    @torch.no_grad()
    def quantized(self) -> FPTensor:
        return FPTensor(self.blocked.quantize(self.v.detach(), self.alpha, self.beta), self.spec, self.input_scale)

    def step_v_in_backward(self, lr: Callable[[], float]) -> Callable[[], None]:
        """``v`` keeps an ordinary gradient here; the optimizer steps it."""
        return lambda: None
