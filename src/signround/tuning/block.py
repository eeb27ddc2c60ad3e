"""One decoder block's SignRound loop.

The block's quantizable Linear layers are swapped, for the duration of the loop, for ``TunableLinear``
modules that compute ``x @ fake_quant(W; V, alpha, beta)^T``.  Signed gradient descent then minimises
the error between the block's outputs on the quantized stream and the full-precision reference outputs (each
token's squared error relative to its target's size: tuning.objectives).
The parameters with the lowest loss seen are kept — the starting point included, and checked on the whole
calibration set at the end, so tuning never returns something worse than its initialisation.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import fused
from ..quant.dispatch import Quantized, dequantize_weight, is_fp, is_gguf, quantize_weight
from ..quant.fp_tensor import quantize_input, with_input_scale
from ..quant.int import (
    GradSink,
    GroupedWeight,
    QuantizedTensor,
    RoundedGroups,
    SignStep,
    Workspace,
    dequantize_rounded_once,
    quantize,
)
from ..runtime import return_freed_memory
from ..schemes import LayerSpec, act_quant_of
from .fp_linear import FPTunableLinear
from .gguf_linear import GGUFTunableLinear
from .inputs import BlockInputs
from .norms import TunableNorm, norm_modules
from .objectives import RELATIVE_MSE, Objective
from .signsgd import SignSGD, linear_decay, run_learning_rates
from .tunable import KeptResult, TunableParameters

logger = logging.getLogger(__name__)


@dataclass
class TuneOptions:
    """Knobs of the tuning loop (a plain copy of the user-facing ones that matter here)."""

    iters: int = 200
    # where blocks are tuned (None: where each block is, but accelerator 0 for a block on the host: engine.placement);
    # several devices (a tuple, or a dict from layer name or pattern to device) spread each block with accelerate,
    # see signround.placement
    device: str | tuple[str, ...] | dict[str, str] | None = None
    low_gpu_mem_usage: bool = False  # cached block inputs / outputs on the host, moved per batch
    max_memory: dict[Any, int | str] | None = None  # several devices: each one's budget (None: its free memory)
    lr: float | None = None
    minmax_lr: float | None = None
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    seed: int = 42
    disable_opt_rtn: bool = False
    # the block's forward under torch.compile and the fake quantizer's fused kernels (quant.fused); None: where
    # it pays (see compiles), True / False: always / never
    enable_torch_compile: bool | None = None
    scale_dtype: torch.dtype = torch.float16
    show_progress: bool = True
    amp: bool = True  # tuning loop in bf16 where the device has fast bf16 (the reference's default)
    # leave each tuned Linear's weight set to its dequantized value; off when the caller packs every block as soon
    # as it is tuned (low_cpu_mem_usage), where the write would only copy a memory-mapped weight into RAM
    write_back: bool = True
    # the block's norm weights tuned with the rounding (the reference's enable_norm_bias_tuning; tuning/norms.py)
    enable_norm_bias_tuning: bool = True
    # the clipping factors alpha / beta tuned with the rounding (the reference's enable_minmax_tuning); None:
    # only where no search placed it (tunes_minmax)
    enable_minmax_tuning: bool | None = None
    # each block tuned on the quantized blocks' outputs (the reference's enable_quanted_input); False: on the fp
    # model's own inputs, so a block fits its own error only
    enable_quanted_input: bool = True


@dataclass
class BlockResult:
    quantized: dict[str, Quantized]
    init_loss: float | None = None
    final_loss: float | None = None
    best_iter: int | None = None
    losses: list[float] = field(default_factory=list)
    # the tuned block's outputs on the calibration inputs, when the candidate selection computed them
    outputs: torch.Tensor | None = None
    # tuned norms: name -> the kept offset v (tuning/norms.py)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerStart:
    """Where one layer's tuning starts, in its grid's own terms: the integer grids' clipping factors ``alpha`` /
    ``beta`` (optimised RTN), the GGUF grids' ``importance`` (the inputs' mean ``x^2`` per column: llama.cpp's
    importance-matrix search), a static floating-point scheme's calibrated ``input_scale`` (FP8_STATIC, NVFP4's
    global scale).  ``None`` everywhere is the plain quantizer of the grid."""

    alpha: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    # q4_0 / q5_0: per block the better of llama.cpp's search and optimised RTN (``tuning.rtn.gguf_legacy_start``):
    # the tunable grid's ``(lo, hi, alpha, beta)`` and the exact start; None: llama.cpp's search alone
    gguf_range: tuple[torch.Tensor, ...] | None = None
    gguf_start: Any = None

    @classmethod
    def of(cls, start: LayerStart | tuple[torch.Tensor | None, torch.Tensor | None]) -> LayerStart:
        """A start, also from an integer grid's ``(alpha, beta)`` pair (what optimised RTN returns)."""
        return start if isinstance(start, LayerStart) else cls(alpha=start[0], beta=start[1])

    def quantized(self, w: torch.Tensor, spec: LayerSpec, scale_dtype: torch.dtype) -> Quantized:
        """The starting point itself, quantized: the result without tuning (``iters=0``)."""
        if is_fp(spec):
            return with_input_scale(quantize_weight(w, spec), self.input_scale)
        if is_gguf(spec) and self.gguf_start is not None:
            return self.gguf_start
        if is_gguf(spec):
            return quantize_weight(w, spec, importance=self.importance)
        return quantize_weight(w, spec, None, _float(self.alpha), _float(self.beta), scale_dtype)

    def tunable(self, linear: nn.Linear, spec: LayerSpec, scale_dtype: torch.dtype) -> TunableParameters:
        """The layer the loop trains, starting here."""
        if is_gguf(spec):
            return GGUFTunableLinear(
                linear, spec, importance=self.importance, start_range=self.gguf_range, start=self.gguf_start
            )
        if is_fp(spec):
            return FPTunableLinear(linear, spec, input_scale=self.input_scale)
        return TunableLinear(linear, spec, self.alpha, self.beta, scale_dtype)


class TunableLinear(TunableParameters):
    """A Linear whose weight is fake-quantized with trainable ``v`` (per weight) and ``alpha``/``beta`` (per group).

    Per weight it holds the checkpoint's own tensor (no float32 copy), ``v`` in float32 and, between a forward
    and the next, the one-byte codes that forward used (``last``): 7 bytes per weight for a bf16 model.  The
    backward recomputes the quantized weight from those codes instead of keeping it.
    """

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
        self.grouped = GroupedWeight.of(weight, spec.group_size)
        self.v = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))
        self.alpha0, self.beta0 = alpha.detach().float().clone(), beta.detach().float().clone()
        self.alpha = nn.Parameter(self.alpha0.clone())
        self.beta = nn.Parameter(self.beta0.clone())
        self.last: RoundedGroups | None = None  # the codes of the last forward with the trainable parameters
        self._judged: QuantizedTensor | None = None
        self._v_step: GradSink | None = None  # v's signed step, applied inside the backward (step_v_in_backward)
        self.workspace: Workspace | None = None  # buffers shared by the block's layers while its loop runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.linear.bias
        bias = None if bias is None else bias.to(x.dtype)
        if self._judged is None:
            out, self.last = self.grouped.linear(
                x, self.spec, self.v, self.alpha, self.beta, self.scale_dtype, bias, self._v_step, self.workspace
            )
            return out
        # A fixed candidate, dequantized per batch: one elementwise pass next to the matmul, where keeping every
        # layer's dense weight for the whole pass would cost 2-4 bytes per weight of the block.
        return F.linear(x, dequantize_rounded_once(self._judged, x.dtype), bias)

    @torch.no_grad()
    def start(self) -> QuantizedTensor:
        """The starting point: ``v = 0`` and the initial clipping."""
        return quantize(self.linear.weight, self.spec, None, self.alpha0, self.beta0, self.scale_dtype)

    @torch.no_grad()
    def quantized(self) -> QuantizedTensor:
        """The current parameters, quantized."""
        return quantize(self.linear.weight, self.spec, self.v, self.alpha, self.beta, self.scale_dtype)

    def step_v_in_backward(self, lr: Callable[[], float]) -> Callable[[], None]:
        """From now on, apply the signed step to ``v`` inside the backward, one row slice at a time as its
        gradient is computed (no weight-sized gradient of ``v`` ever exists); returns the undo."""
        self._v_step = SignStep(self.v.detach().view(self.grouped.wg.shape), lr)

        def undo() -> None:
            self._v_step = None

        return undo


@torch.no_grad()
def clamp_after_step(tunables: dict[str, TunableParameters], norms: dict[str, TunableNorm]) -> None:
    """After a step: every rounding offset ``v`` back in [-0.5, 0.5] and every clipping factor in [0, 1], as
    multi-tensor ops (on a GPU a kernel or two for the whole block instead of three per layer).  An offset
    stepped inside the backward (``step_v_in_backward``) was clamped there and is left alone: no pass over every
    weight's offset again."""
    offsets = [tl.v for tl in tunables.values() if getattr(tl, "_v_step", None) is None]
    offsets += [tn.v for tn in norms.values()]
    factors = [p for tl in tunables.values() for p in (tl.alpha, tl.beta)]
    for tensors, low, high in ((offsets, -0.5, 0.5), (factors, 0.0, 1.0)):
        if tensors:
            torch._foreach_clamp_min_(tensors, low)
            torch._foreach_clamp_max_(tensors, high)


def _kept(tl: TunableParameters) -> Any:
    """A layer's result put aside as the best step, before the optimizer moves the parameters: integer grids pack
    their codes (KeptCodes), GGUF and fp grids quantize at once (KeptResult).  A layer this step did not run (an
    expert no token of the batch was routed to) has no forward result: its parameters, unchanged by the step, are
    quantized."""
    return KeptResult(tl.quantized()) if tl.last is None else tl.last.kept()


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
    outs = [block_output(block(h, **kw)).to(inputs.hidden.device) for h, kw in inputs.batches(batch_size)]
    return torch.cat(outs, dim=0)  # where the cache is


def cast_floats(obj: object, dtype: torch.dtype | None) -> object:
    """``obj`` with every floating tensor in it (also inside tuples, lists, dicts) cast to ``dtype``."""
    if dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast_floats(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: cast_floats(o, dtype) for k, o in obj.items()}
    return obj


@contextmanager
def block_in_dtype(block: nn.Module, keep: Iterable[str], dtype: torch.dtype | None) -> Iterator[None]:
    """Hold the block's floating parameters and buffers in ``dtype``, except under the ``keep`` submodules.

    Mixed precision for the loop: running the whole block in bf16 (as the reference does) instead of
    under autocast avoids casting the residual stream back and forth around every op; the tunable
    layers keep their weights as stored (quantized in float32 arithmetic) and only hand bf16 weights to the
    matmul.  Restored on exit.
    """
    if dtype is None:
        yield
        return
    prefixes = tuple(f"{name}." for name in keep)
    saved = []
    for name, tensor in itertools.chain(block.named_parameters(), block.named_buffers()):
        if name.startswith(prefixes) or not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        saved.append((tensor, tensor.data))
        tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


@torch.no_grad()
def _full_loss(
    block: nn.Module,
    tunables: dict[str, TunableParameters],
    candidate: dict[str, Any],
    inputs: BlockInputs,
    targets: torch.Tensor,
    batch_size: int,
    dtype: torch.dtype | None,
    keep_outputs: bool = True,
    objective: Objective = RELATIVE_MSE,
) -> tuple[float, torch.Tensor | None]:
    """``objective``'s loss against ``targets`` (blocks: the relative squared error) over every cached sample of the block
    computing with ``candidate``'s weights, and the outputs (None unless ``keep_outputs``)."""
    total, count, outs = 0.0, 0, []
    with ExitStack() as stack:
        for name, tl in tunables.items():
            stack.enter_context(tl.judging(candidate[name]))
        for (h, kw), idx in zip(inputs.batches(batch_size), inputs.batch_indices(batch_size), strict=True):
            out = block_output(block(cast_floats(h, dtype), **cast_floats(kw, dtype)))
            total += objective.loss(out, targets[idx].to(out.device).float(), "sum").item()
            count += objective.units(out)
            if keep_outputs:
                outs.append(out.to(inputs.hidden.device))
    return total / max(count, 1), torch.cat(outs, dim=0) if keep_outputs else None


def tune_block(
    block: nn.Module,
    layers: dict[str, tuple[nn.Linear, LayerSpec, LayerStart | tuple[torch.Tensor | None, torch.Tensor | None]]],
    inputs: BlockInputs,
    targets: torch.Tensor,
    options: TuneOptions,
    progress: Callable[[int, float], None] | None = None,
    keep_outputs: bool = True,
    objective: Objective = RELATIVE_MSE,
) -> BlockResult:
    """Tune the block's layers (``name -> (linear, spec, start)``, names relative to ``block``; ``start`` a
    :class:`LayerStart` or an integer grid's ``(alpha0, beta0)``) to minimise ``objective`` (the loop's loss; the
    whole-set judging takes ``objective.judge``; hidden states: mean squared error).

    Returns the quantized tensors of the kept parameters and the block's outputs with them (not with
    ``keep_outputs=False``: the head's logits, which nothing downstream reads, would take tokens x vocab); with
    ``options.write_back`` (or without tuning) each Linear's weight is left set to its dequantized value, so the
    block computes what the packed model will.  Without tuning, outputs are computed only where layers quantize
    their inputs (fp schemes): the block's plain forward would miss that.
    """
    starts = {name: LayerStart.of(start) for name, (_linear, _spec, start) in layers.items()}
    if options.iters == 0:  # nothing to tune: no per-weight state (v, codes) for the whole block at once
        quantized = {
            name: starts[name].quantized(linear.weight, spec, options.scale_dtype)
            for name, (linear, spec, _start) in layers.items()
        }
        _write_dequantized(layers, quantized)
        return BlockResult(
            quantized=quantized, outputs=_outputs_with_quantized_inputs(block, layers, quantized, inputs, options)
        )
    return_freed_memory()  # the passes before (targets, importance, start search) leave no heap behind the loop's
    tunables = {
        name: starts[name].tunable(linear, spec, options.scale_dtype) for name, (linear, spec, _start) in layers.items()
    }
    norms: dict[str, TunableNorm] = {}
    if options.enable_norm_bias_tuning:
        spec = min((s for _l, s, _st in layers.values()), key=lambda s: s.bits)
        found = norm_modules(block, set(tunables))
        norms = {name: TunableNorm(module, spec.bits, spec.group_size) for name, module in found.items()}
    for name, tl in tunables.items():
        block.set_submodule(name, tl)
    for name, tn in norms.items():
        block.set_submodule(name, tn)
    try:
        dtype = _loop_dtype(options, inputs, targets)
        compiling = compiles(options, tunables, block)
        with block_in_dtype(block, [*tunables, *norms], dtype), fused.allowed(compiling):
            result = _signsgd_loop(
                block, tunables, inputs, targets, options, progress, dtype, keep_outputs, compiling, objective, norms
            )
    finally:
        for name, tl in tunables.items():
            block.set_submodule(name, tl.linear)
        for name, tn in norms.items():
            block.set_submodule(name, tn.norm)
    for name, v in result.norms.items():
        norms[name].write(v)
    if options.write_back:
        _write_dequantized(layers, result.quantized)
    return result


@torch.no_grad()
def _outputs_with_quantized_inputs(
    block: nn.Module,
    layers: dict[str, tuple[nn.Linear, ...]],
    quantized: dict[str, Quantized],
    inputs: BlockInputs,
    options: TuneOptions,
) -> torch.Tensor | None:
    """The block's outputs with each layer's input quantized as its scheme says (MX / NVFP4 / FP8 activations),
    or None when no layer quantizes its input (the caller's plain forward is then exact)."""
    acting = {name: q for name, q in quantized.items() if act_quant_of(layers[name][1]) is not None}
    if not acting:
        return None

    def hook(spec: LayerSpec, scale: torch.Tensor | None) -> Callable[..., tuple[torch.Tensor, ...]]:
        return lambda _m, args: (quantize_input(args[0], spec, scale), *args[1:])

    handles = [
        layers[name][0].register_forward_pre_hook(hook(layers[name][1], getattr(q, "input_scale", None)))
        for name, q in acting.items()
    ]
    try:
        return run_block(block, inputs, min(options.batch_size, len(inputs)))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _write_dequantized(layers: dict[str, tuple[nn.Linear, ...]], quantized: dict[str, Quantized]) -> None:
    """Each Linear computes what its packed layer will."""
    for name, (linear, *_rest) in layers.items():
        linear.weight.copy_(dequantize_weight(quantized[name], linear.weight.dtype))


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


# Where torch.compile pays for itself (enable_torch_compile=None): blocks of at least this many tuned weights (on
# SmolLM2-135M's 4.5 M a block's steady iteration is about 10 % faster on an AMX CPU; compiling costs seconds once
# per process: bench/profile_tune.py), tuned for at least this many iterations, on one CPU or CUDA device.
COMPILE_MIN_WEIGHTS = 1 << 21
COMPILE_MIN_ITERS = 20


def compiles(options: TuneOptions, tunables: dict[str, TunableParameters], block: nn.Module | None = None) -> bool:
    """Whether this block's loop runs under torch.compile (and the fake quantizer's fused kernels).  By default not
    for mixture-of-experts blocks (routing is data-dependent control flow: graph breaks per expert, not measured to
    pay) nor for a block spread over devices."""
    if options.enable_torch_compile is not None:
        return options.enable_torch_compile
    if isinstance(options.device, (tuple, list, dict)) or options.iters < COMPILE_MIN_ITERS:
        return False
    if block is not None and any(hasattr(module, "experts") for module in block.modules()):
        return False
    weights = [tl.linear.weight for tl in tunables.values()]
    return (
        all(w.device.type in ("cpu", "cuda") for w in weights)
        and sum(w.numel() for w in weights) >= COMPILE_MIN_WEIGHTS
    )


def _loop_dtype(options: TuneOptions, inputs: BlockInputs, targets: torch.Tensor) -> torch.dtype | None:
    """bf16 for the loop and the candidate selection where the device runs it natively (``amp``), else None
    (the block's own dtype).  The fake quantizer's arithmetic, the targets and the loss stay float32."""
    device = targets.device if targets.device.type != "cpu" else inputs.hidden.device
    return torch.bfloat16 if options.amp and fast_bf16(device) else None


def tunes_minmax(enable: bool | None, disable_opt_rtn: bool, spec: LayerSpec) -> bool:
    """Whether a layer's clipping factors ``alpha`` / ``beta`` move with its rounding.  By default only where no
    search placed them: a GGUF grid starts from llama.cpp's importance-weighted search of each sub-block's scale (and
    min), an integer grid from optimised RTN's activation-weighted search of each group's clipping, and moving those
    on the calibration text fitted it at the cost of other text, while the rounding offsets alone (with the norms)
    moved the model closer to the fp one (docs/benchmarks.md, "GGUF: what tuning moves" and "The clipping: kept
    where a search put it").  Plain-RTN starts (``disable_opt_rtn``) and the fp grids (full block ranges) tune it."""
    if enable is not None:  # the user's enable_minmax_tuning
        return enable
    if is_gguf(spec):
        return False
    return is_fp(spec) or disable_opt_rtn


def _signsgd_loop(
    block: nn.Module,
    tunables: dict[str, TunableLinear | GGUFTunableLinear],
    inputs: BlockInputs,
    targets: torch.Tensor,
    options: TuneOptions,
    progress: Callable[[int, float], None] | None,
    dtype: torch.dtype | None,
    keep_outputs: bool = True,
    compiling: bool = False,
    objective: Objective = RELATIVE_MSE,
    norms: dict[str, TunableNorm] | None = None,
) -> BlockResult:
    norms = norms or {}
    # the run's step, resolved by the caller from every layer it quantizes; this block's own layers otherwise
    specs = [tl.spec for tl in tunables.values()]
    lr, minmax_lr = run_learning_rates(options.lr, options.minmax_lr, options.iters, specs)
    factors = []
    for tl in tunables.values():
        tuned = tunes_minmax(options.enable_minmax_tuning, options.disable_opt_rtn, tl.spec)
        tl.alpha.requires_grad_(tuned)  # frozen: no gradient computed for them either
        tl.beta.requires_grad_(tuned)
        factors += [tl.alpha, tl.beta] if tuned else []
    optimizer = SignSGD(
        [
            {"params": [tl.v for tl in tunables.values()] + [tn.v for tn in norms.values()], "lr": lr},
            {"params": factors, "lr": minmax_lr},
        ],
        lr=lr,
    )
    scheduler = linear_decay(optimizer, options.iters)
    forward = block
    if compiling:  # each tunable layer a graph break: Dynamo cannot trace the fake quantizer's autograd Function
        for tl in tunables.values():
            tl.forward = torch.compiler.disable(tl.forward)  # (torch.compiler imports Dynamo: only here)
        forward = torch.compile(block)
    generator = torch.Generator().manual_seed(options.seed)
    n = len(inputs)
    bs = min(options.batch_size, n)
    # Every step's batch drawn up front (the same sequence as drawing each in turn) and moved where the cache is
    # in one transfer: on a GPU a host index per step would be a blocking copy per step, and another per tensor
    # it indexes.  The arguments every sample shares (rotary tables, masks) are cast to the loop's dtype once.
    steps = options.iters * options.gradient_accumulate_steps
    batches = [torch.randperm(n, generator=generator)[:bs] for _ in range(steps)]
    batch_indices = iter(torch.stack(batches).to(inputs.hidden.device) if batches else [])
    inputs = inputs.with_shared(cast_floats(inputs.shared, dtype))

    # With one step per batch, v's signed step runs inside the backward as each layer's gradient is ready (v's
    # gradients never all exist at once); accumulated gradients take the optimizer's step.
    step_in_backward = options.gradient_accumulate_steps == 1
    v_group = optimizer.param_groups[0]
    removers = [tl.step_v_in_backward(lambda: v_group["lr"]) for tl in tunables.values()] if step_in_backward else []

    # The minibatch winner is kept as the codes its forward computed (not a copy of v), packed (KeptCodes); the
    # starting point and the last iterate are quantized again only to be judged.
    best_loss, best_state, best_iter = float("inf"), None, -1
    best_norms: dict[str, torch.Tensor] = {}
    losses: list[float] = []
    workspace = Workspace()
    for tl in tunables.values():
        tl.workspace = workspace
    try:
        for it in range(options.iters):
            total = 0.0
            for _ in range(options.gradient_accumulate_steps):
                idx = next(batch_indices)
                h, kw = inputs.batch(idx)
                h, kw = cast_floats(h, dtype), cast_floats(kw, dtype)
                try:
                    out = block_output(forward(h, **kw))
                except Exception as exc:  # a block torch.compile cannot take: the eager block computes the same
                    if forward is block or it > 0:
                        raise
                    logger.warning("torch.compile failed on this block (%s); tuning it eagerly", fused.first_line(exc))
                    forward = block
                    out = block_output(forward(h, **kw))
                loss = objective.loss(out, targets[idx].to(out.device).float(), "mean")
                total += loss.item() / options.gradient_accumulate_steps
                (loss / options.gradient_accumulate_steps).backward()
                del out, loss  # their graph holds every v (AccumulateGrad): not past the loop into the judging
            if total < best_loss:  # the loss of the parameters *before* this step: keep the codes they gave
                best_loss, best_iter, best_state = total, it, None  # (the previous best let go first)
                best_state = {name: _kept(tl) for name, tl in tunables.items()}
                best_norms = {name: tn.v.detach().clone() for name, tn in norms.items()}
            # The backward is done: this step's codes go back to the workspace for the next one.
            for tl in tunables.values():
                if tl.last is not None and tl.last.marked_codes is not None:
                    workspace.recycle(tl.last.marked_codes)
                tl.last = None  # (an expert without tokens next step must not hand its buffer back twice)
            losses.append(total)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_after_step(tunables, norms)
            scheduler.step()
            if progress is not None:
                progress(it, total)
    finally:
        for remove in removers:
            remove()
        for tl in tunables.values():
            tl.__dict__.pop("forward", None)  # the class's forward again
        for tl in tunables.values():
            tl.workspace = None
    # Minibatch losses come from different random batches, so the "best" one is a noisy pick: judge the
    # last iterate, the minibatch winner and the starting point on the whole calibration set, keep the lowest.
    # The winner's outputs on that pass are the block's quantized-stream outputs (no separate pass).  The last
    # iterate is quantized first, so that v (4 bytes per weight) is gone before the judging passes.
    last = {name: tl.quantized() for name, tl in tunables.items()}
    del optimizer, scheduler, workspace
    for tl in tunables.values():
        tl.end_training()
    return_freed_memory()  # the loop's freed state back to the OS before the judging passes allocate theirs

    # A candidate names a quantized weight per layer and a norm offset v per tuned norm (the norms judge like layers).
    judged: dict[str, TunableParameters] = {**tunables, **norms}
    final: tuple[float, dict[str, Any], int, torch.Tensor | None] | None = None
    init_loss = float("nan")

    def judge(iteration: int, candidate: dict[str, Any]) -> None:
        nonlocal final, init_loss
        loss, outputs = _full_loss(block, judged, candidate, inputs, targets, bs, dtype, keep_outputs, objective.judge)
        if iteration == -1:
            init_loss = loss
        if final is None or loss < final[0]:
            final = (loss, candidate, iteration, outputs)

    last.update({name: tn.v.detach().clone() for name, tn in norms.items()})
    judge(options.iters, last)
    del last
    if best_state is not None and best_iter != 0:  # (iteration 0's winner is the starting point itself)
        # each layer's marked codes are let go as soon as they are converted
        judge(
            best_iter,
            {name: best_state.pop(name).quantized(options.scale_dtype) for name in list(best_state)} | best_norms,
        )
    del best_state
    judge(
        -1, {name: tl.start() for name, tl in tunables.items()} | {n: torch.zeros_like(tn.v) for n, tn in norms.items()}
    )
    assert final is not None
    final_loss, candidate, best_iter, outputs = final
    return BlockResult(
        quantized={name: candidate[name] for name in tunables},
        init_loss=init_loss,
        final_loss=final_loss,
        best_iter=best_iter,
        losses=losses,
        outputs=None if outputs is None else outputs.to(inputs.hidden.dtype),
        norms={} if best_iter == -1 else {name: candidate[name] for name in norms},
    )
