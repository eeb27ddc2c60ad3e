"""What every tunable layer of the block loop shares, whatever grid it quantizes to.

The loop trains ``v`` (per weight) and ``alpha`` / ``beta`` (per group) and then judges fixed candidates on the
whole calibration set; the integer (:class:`~signround.tuning.block.TunableLinear`) and GGUF
(:class:`~signround.tuning.gguf_linear.GGUFTunableLinear`) layers differ only in how they fake-quantize.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class KeptResult:
    """A step's result, computed when the loop keeps the step as its best so far (from the live parameters, before
    the optimizer moves them): one quantized weight instead of copies of ``v`` / ``alpha`` / ``beta``."""

    result: Any
    marked_codes: None = None  # nothing goes back to int.py's workspace

    def quantized(self, scale_dtype: torch.dtype | None = None) -> Any:
        return self.result


class TunableParameters(nn.Module):
    """``v`` / ``alpha`` / ``beta`` handling and candidate judging; subclasses set the parameters and ``last``."""

    v: Any
    alpha: Any
    beta: Any
    last: Any
    _judged: Any

    @contextmanager
    def judging(self, candidate: Any) -> Iterator[None]:
        """Within this context the layer computes with ``candidate``'s weights (for the whole-set loss)."""
        self._judged = candidate
        try:
            yield
        finally:
            self._judged = None

    def end_training(self) -> None:
        """Drop the trained parameters and the last forward's state (only fixed candidates are judged now)."""
        self.v = self.alpha = self.beta = None
        self.last = None
