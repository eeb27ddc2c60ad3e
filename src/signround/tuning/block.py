"""One decoder block's SignRound loop.

The block's quantizable Linear layers are swapped, for the duration of the loop, for ``TunableLinear``
modules that compute ``x @ fake_quant(W; V, alpha, beta)^T``.  Signed gradient descent then minimises
the MSE between the block's outputs on the quantized stream and the full-precision reference outputs.
The parameters with the lowest loss seen are kept — the starting point included, and checked on the whole
calibration set at the end, so tuning never returns something worse than its initialisation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int import GroupedWeight, QuantizedTensor, dequantize, quantize
from ..schemes import LayerSpec
from .inputs import BlockInputs
from .signsgd import SignSGD, default_lr, linear_decay

logger = logging.getLogger(__name__)


@dataclass
class TuneOptions:
    """Knobs of the tuning loop (a plain copy of the user-facing ones that matter here)."""

    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    seed: int = 42
    disable_opt_rtn: bool = False
    enable_torch_compile: bool = False
    scale_dtype: torch.dtype = torch.float16
    show_progress: bool = True
    amp: bool = True  # bf16 autocast in the tuning loop where the device has fast bf16 (the reference's default)


@dataclass
class BlockResult:
    quantized: dict[str, QuantizedTensor]
    init_loss: float | None = None
    final_loss: float | None = None
    best_iter: int | None = None
    losses: list[float] = field(default_factory=list)


class TunableLinear(nn.Module):
    """A Linear whose weight is fake-quantized with trainable ``v`` (per weight) and ``alpha``/``beta`` (per group)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: LayerSpec,
        alpha: torch.Tensor,
        beta: torch.Tensor,
        scale_dtype: torch.dtype,
    ):
        super().__init__()
        self.linear = linear
        self.spec = spec
        self.scale_dtype = scale_dtype
        weight = linear.weight.detach()
        self.grouped = GroupedWeight.of(weight.float(), spec.group_size)
        self.v = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.alpha = nn.Parameter(alpha.float().clone())
        self.beta = nn.Parameter(beta.float().clone())

    def qdq_weight(self) -> torch.Tensor:
        return self.grouped.fake_quant(self.spec, self.v, self.alpha, self.beta, self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qdq_weight().to(x.dtype)
        return F.linear(x, w, self.linear.bias)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.0, 1.0)
        self.beta.clamp_(0.0, 1.0)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"v": self.v.detach().clone(), "alpha": self.alpha.detach().clone(), "beta": self.beta.detach().clone()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.v.copy_(state["v"])
        self.alpha.copy_(state["alpha"])
        self.beta.copy_(state["beta"])

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        return quantize(self.linear.weight, self.spec, self.v, self.alpha, self.beta, self.scale_dtype)


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def block_output(out: object) -> torch.Tensor:
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int) -> torch.Tensor:
    """The block's outputs for every cached sample, in batches."""
    outs = [block_output(block(h, **kw)) for h, kw in inputs.batches(batch_size)]
    return torch.cat(outs, dim=0)


@torch.no_grad()
def _full_loss(
    block: nn.Module, inputs: BlockInputs, targets: torch.Tensor, batch_size: int, autocast: torch.autocast
) -> float:
    """Mean squared error of the block's outputs against ``targets`` over every cached sample."""
    total, count = 0.0, 0
    for (h, kw), idx in zip(inputs.batches(batch_size), inputs.batch_indices(batch_size), strict=True):
        with autocast:
            out = block_output(block(h, **kw))
        total += F.mse_loss(out.float(), targets[idx].to(out.device).float(), reduction="sum").item()
        count += out.numel()
    return total / max(count, 1)


def tune_block(
    block: nn.Module,
    layers: dict[str, tuple[nn.Linear, LayerSpec, tuple[torch.Tensor, torch.Tensor]]],
    inputs: BlockInputs,
    targets: torch.Tensor,
    options: TuneOptions,
    progress: Callable[[int, float], None] | None = None,
) -> BlockResult:
    """Tune the block's layers (``name -> (linear, spec, (alpha0, beta0))``, names relative to ``block``).

    Returns the quantized tensors of the kept parameters and leaves each Linear's weight set to its
    dequantized value, so the block now computes what the packed model will.
    """
    tunables = {
        name: TunableLinear(linear, spec, a0, b0, options.scale_dtype)
        for name, (linear, spec, (a0, b0)) in layers.items()
    }
    for name, tl in tunables.items():
        block.set_submodule(name, tl)
    try:
        result = _signsgd_loop(block, tunables, inputs, targets, options, progress) if options.iters > 0 else None
        quantized = {name: tl.quantized() for name, tl in tunables.items()}
    finally:
        for name, tl in tunables.items():
            block.set_submodule(name, tl.linear)
    for name, (linear, _spec, _init) in layers.items():
        with torch.no_grad():
            linear.weight.copy_(dequantize(quantized[name], torch.float32).to(linear.weight.dtype))
    if result is None:
        return BlockResult(quantized=quantized)
    result.quantized = quantized
    return result


def _signsgd_loop(
    block: nn.Module,
    tunables: dict[str, TunableLinear],
    inputs: BlockInputs,
    targets: torch.Tensor,
    options: TuneOptions,
    progress: Callable[[int, float], None] | None,
) -> BlockResult:
    min_bits = min(tl.spec.bits for tl in tunables.values())
    lr = options.lr if options.lr is not None else default_lr(options.iters, min_bits)
    minmax_lr = options.minmax_lr if options.minmax_lr is not None else lr
    optimizer = SignSGD(
        [
            {"params": [tl.v for tl in tunables.values()], "lr": lr},
            {"params": [p for tl in tunables.values() for p in (tl.alpha, tl.beta)], "lr": minmax_lr},
        ],
        lr=lr,
    )
    scheduler = linear_decay(optimizer, options.iters)
    generator = torch.Generator().manual_seed(options.seed)
    forward = torch.compile(block) if options.enable_torch_compile else block
    n = len(inputs)
    bs = min(options.batch_size, n)
    device = targets.device if targets.device.type != "cpu" else inputs.hidden.device
    # Mixed precision for the block's matmuls in the loop and in the candidate selection; the fake quantizer,
    # the targets and the loss stay float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.amp and fast_bf16(device))

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        return {name: tl.snapshot() for name, tl in tunables.items()}

    init_state = snapshot()
    init_loss = _full_loss(block, inputs, targets, bs, autocast)
    best_loss, best_state, best_iter = float("inf"), init_state, -1
    losses: list[float] = []
    for it in range(options.iters):
        total = 0.0
        for _ in range(options.gradient_accumulate_steps):
            idx = torch.randperm(n, generator=generator)[:bs]
            h, kw = inputs.batch(idx)
            with autocast:
                out = block_output(forward(h, **kw))
            loss = F.mse_loss(out.float(), targets[idx].to(out.device).float())
            (loss / options.gradient_accumulate_steps).backward()
            total += loss.item() / options.gradient_accumulate_steps
        losses.append(total)
        if total < best_loss:  # loss of the parameters *before* this step
            best_loss, best_state, best_iter = total, snapshot(), it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for tl in tunables.values():
            tl.clamp_()
        scheduler.step()
        if progress is not None:
            progress(it, total)
    # Minibatch losses come from different random batches, so the "best" one is a noisy pick: judge the
    # minibatch winner, the last iterate and the starting point on the whole calibration set, keep the lowest.
    candidates = {"best": (best_state, best_iter), "last": (snapshot(), options.iters)}
    final_loss, final_state, best_iter = init_loss, init_state, -1
    for state, iteration in candidates.values():
        if iteration == 0:  # the minibatch winner is the starting point itself
            continue
        for name, tl in tunables.items():
            tl.load(state[name])
        loss = _full_loss(block, inputs, targets, bs, autocast)
        if loss < final_loss:
            final_loss, final_state, best_iter = loss, state, iteration
    for name, tl in tunables.items():
        tl.load(final_state[name])
    return BlockResult(quantized={}, init_loss=init_loss, final_loss=final_loss, best_iter=best_iter, losses=losses)
