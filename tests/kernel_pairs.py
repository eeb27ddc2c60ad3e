"""Shared by the CPU kernel tests: a layer on the torch reference and the same layer on the kernel under test."""

from __future__ import annotations

import torch

from signround.kernels.base import QuantLinear
from signround.kernels.torch import TorchQuantLinear
from signround.quant.int import quantize
from signround.schemes import LayerSpec


def reference_and_kernel(
    kernel: type[QuantLinear],
    spec: LayerSpec,
    packing: str,
    dtype: torch.dtype,
    out_features: int,
    in_features: int,
    seed: int,
    weight: torch.Tensor | None = None,
    with_bias: bool = True,
) -> tuple[QuantLinear, QuantLinear]:
    """One quantized layer (random, or ``weight`` quantized), with a random bias unless ``with_bias`` is false,
    built on the reference and on ``kernel``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.05 if weight is None else weight
    qt = quantize(w, spec)
    bias = torch.randn(out_features, generator=g) * 0.1 if with_bias else None
    return (TorchQuantLinear.from_quantized(qt, packing, bias, dtype),
            kernel.from_quantized(qt, packing, bias, dtype))  # fmt: skip


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in float64."""
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


def graph_replay_and_eager(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s output for ``x`` from a CUDA graph captured on other input (warmed up on a side stream, as
    capture needs), and eagerly.  A kernel that leaves torch's current stream is not recorded, so its replay keeps
    the output of the capture-time input and differs; equal outputs say the whole forward was captured."""
    static = torch.randn_like(x)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(static)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        return out.clone(), layer(x)
