"""SignRound on llama.cpp's GGUF grids: a Linear whose weight is fake-quantized in a GGUF type.

The tuned values are those the file stores: per weight a rounding offset ``v``, per sub-block factors ``alpha`` /
``beta`` that shrink the range llama.cpp's own search found (:func:`~signround.quant.gguf_tunable.search_range`);
the fake quantizer then rounds the sub-block scales and mins to the type's integer scales and fp16 super-block
scales exactly as llama.cpp stores them (:func:`~signround.quant.gguf_tunable.gguf_fake_quant`), so what tuning
measures is bit for bit what the file dequantizes to.  ``alpha = beta = 1``, ``v = 0`` is llama.cpp's quantizer:
given the layer's ``importance`` (its inputs' mean ``x^2`` per column, as ``llama-imatrix`` measures it) its
importance-matrix path, else its reference one; that start (``start()``, ``llama-quantize``'s bytes) is one of
the candidates the block loop judges, so the result is never worse than it on the block loss.

Same contract as :class:`~signround.tuning.block.TunableLinear` (the block loop drives both); it keeps a float32
dequantized weight for autograd instead of int.py's fused one-byte-code kernel, which is fine at the sizes GGUF
users tune on a CPU and the place to optimise next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import gguf
from ..quant.dispatch import dequantize_weight
from ..quant.gguf_tunable import gguf_fake_quant, search_range, stage2_weights, to_gguf
from ..schemes import LayerSpec, gguf_type_of
from .tunable import KeptResult, TunableParameters


@dataclass
class GGUFStep:
    """The parameters of one forward (the live tensors: valid until the optimizer steps, so the loop calls
    :meth:`kept` before that when the step's minibatch loss is the best so far).  ``marked_codes`` is None: nothing
    goes back to int.py's workspace."""

    weight: torch.Tensor
    type_name: str
    lo: torch.Tensor
    hi: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    v: torch.Tensor
    marked_codes: None = None
    importance: torch.Tensor | None = None

    def quantized(self, scale_dtype: torch.dtype | None = None) -> gguf.GGUFQuantized:
        return to_gguf(
            self.weight, self.type_name, self.lo, self.hi, self.alpha, self.beta, self.v, importance=self.importance
        )

    def kept(self) -> KeptResult:
        return KeptResult(self.quantized())


class GGUFTunableLinear(TunableParameters):
    """A Linear fake-quantized in a GGUF type with trainable ``v`` (per weight), ``alpha`` / ``beta`` (per
    sub-block); see the module docstring.  ``importance``: float ``[in_features]`` (None: llama.cpp's search
    without an importance matrix)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: LayerSpec,
        scale_dtype: torch.dtype | None = None,
        importance: torch.Tensor | None = None,
        start_range: tuple[torch.Tensor, ...] | None = None,
        start: gguf.GGUFQuantized | None = None,
    ):
        super().__init__()
        t = gguf_type_of(spec.data_type)
        if t is None:
            raise ValueError(f"{spec} is not a GGUF type")
        self.linear, self.spec, self.type_name = linear, spec, t.name
        weight = linear.weight.detach()
        if start_range is not None:  # q4_0 / q5_0 from tuning.rtn.gguf_legacy_start: their stage 2 needs no
            importance = None  # importance, and the start is the given grid, codes recomputed
        self.importance = None if importance is None else importance.detach().float().to(weight.device)
        if start_range is None:
            self.lo, self.hi = search_range(weight, t.name, self.importance)
            alpha0 = beta0 = torch.ones(self.lo.shape, dtype=torch.float32, device=weight.device)
        else:
            self.lo, self.hi, alpha0, beta0 = start_range
        self.given_start = start  # the exact start blocks that go with start_range (judged as a candidate)
        self.sub_weights = stage2_weights(weight, t.name, self.importance)  # fixed: they depend on the weight only
        self.v = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.alpha = nn.Parameter(alpha0.float().clone())
        self.beta = nn.Parameter(beta0.float().clone())
        self.last: GGUFStep | None = None
        self._judged: gguf.GGUFQuantized | None = None
        self.workspace = None  # the block loop sets it for int.py's layers; unused here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self._judged is not None:
            return F.linear(x, dequantize_weight(self._judged, x.dtype), bias)
        w_hat, _codes = gguf_fake_quant(
            self.linear.weight.detach(), self.type_name, self.lo, self.hi, self.alpha, self.beta, self.v,
            sub_weights=self.sub_weights,
        )  # fmt: skip
        self.last = GGUFStep(
            self.linear.weight.detach(), self.type_name, self.lo, self.hi,
            self.alpha.detach(), self.beta.detach(), self.v.detach(), importance=self.importance,
        )  # fmt: skip
        return F.linear(x, w_hat.to(x.dtype), bias)

    @torch.no_grad()
    def start(self) -> gguf.GGUFQuantized:
        """llama.cpp's own quantization of the weight: byte for byte ``llama-quantize`` with this layer's
        importance as its imatrix (without one when there is none); with a given start range, that grid."""
        if self.given_start is not None:
            return self.given_start
        return gguf.quantize(self.linear.weight.detach(), self.type_name, self.importance)

    @torch.no_grad()
    def quantized(self) -> gguf.GGUFQuantized:
        return to_gguf(
            self.linear.weight.detach(), self.type_name, self.lo, self.hi, self.alpha, self.beta, self.v.detach(),
            importance=self.importance,
        )  # fmt: skip

    def step_v_in_backward(self, lr: Callable[[], float]) -> Callable[[], None]:
        """``v`` keeps an ordinary gradient here; the optimizer steps it."""
        return lambda: None
