"""The block walk: decoder blocks are tuned in order, each on the outputs of the already-quantized ones.

Two streams of hidden states flow through the model: the full-precision stream (fp inputs -> fp block ->
reference outputs, the targets) and the quantized stream (outputs of the quantized blocks, what the
tuned layers will really see).  Each block is tuned to map quantized-stream inputs onto full-precision
targets, which also corrects the error accumulated upstream.

Memory policy lives here only: the cached streams stay on the device of the block being tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import final_norm, find_blocks, head_is_tied, head_name, observing_experts
from ..models import quantizable_layers as quantizable_layers  # re-exported: the engine's candidates
from ..models.layout import text_config
from ..offload import is_offloaded, materialize
from ..placement import Dispatch, Spread, main_device
from ..quant.dispatch import Quantized, dequantize_weight, is_fp, is_gguf, moved, quantize_weight
from ..quant.fp_tensor import calibrated_input_scale, needs_input_scale
from ..runtime import return_freed_memory
from ..schemes import LayerSpec, QuantPlan
from .block import BlockResult, LayerStart, TuneOptions, run_block, tune_block
from .head import tune_head
from .inputs import BlockInputs, capture_block_inputs
from .objectives import block_objective
from .rtn import gguf_legacy_start, optimized_rtn_params, plain_rtn_params

logger = logging.getLogger(__name__)


@dataclass
class TuneReport:
    """What tuning produced: the quantized tensors by full layer name, and per-block loss figures."""

    quantized: dict[str, Quantized] = field(default_factory=dict)
    block_losses: list[tuple[float | None, float | None]] = field(default_factory=list)
    # Mixture-of-experts coverage: tokens the calibration set routed to each expert (``<experts module>.<i>``).
    # An expert with none still gets quantized: its start (optimised RTN) is weighted by every token's inputs,
    # and the block loss gives it no gradient, so it keeps that start.
    expert_tokens: dict[str, int] = field(default_factory=dict)
    # Layers packed in place as soon as their block was tuned (low_cpu_mem_usage); their QuantizedTensors were
    # dropped to free memory, the installed layers hold them (packing name by layer).
    packed: dict[str, str] = field(default_factory=dict)
    # lm_head tuned with SignRound: its loss on the calibration logits at the start and kept (None: not tuned)
    head_loss: tuple[float, float] | None = None
    # norm weights tuned with their block (enable_norm_bias_tuning), by full parameter name, as the model holds them
    norms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        """Layers quantized, whether their tensors are here or already packed in place."""
        return len(self.quantized) + len(self.packed)

    @property
    def experts_on_data(self) -> int:
        return sum(1 for n in self.expert_tokens.values() if n > 0)

    @property
    def experts_without_tokens(self) -> list[str]:
        return [name for name, n in self.expert_tokens.items() if n == 0]


class _InputEnergy:
    """Forward hooks accumulating ``E[x_j^2]`` per input feature of some Linear layers, and the inputs' largest
    magnitude (``amax``: static activation scales are calibrated from it)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sums = {
            name: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device) for name, m in modules.items()
        }
        self.amax = {name: torch.zeros((), dtype=torch.float32, device=m.weight.device) for name, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] += x.square().sum(0).to(self.sums[name].device)  # a layer placed off the main device
            self.amax[name] = torch.maximum(self.amax[name], x.abs().amax().to(self.amax[name].device))
            self.counts[name] += x.shape[0]

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {name: s / max(self.counts[name], 1) for name, s in self.sums.items()}


def _layer_start(
    linear: nn.Linear,
    spec: LayerSpec,
    importance: torch.Tensor | None,
    options: TuneOptions,
    input_amax: torch.Tensor | None = None,
) -> LayerStart:
    """Where the layer's tuning (or its ``iters=0`` result) starts, from the calibration statistics of its inputs:
    ``importance`` (mean ``x^2`` per input column) and ``input_amax`` (largest input magnitude)."""
    if importance is not None and not bool(importance.any()):  # no input reached it (a Llama-4 expert no token
        importance = None  # was routed to sees zeros): weigh every input feature alike
    if is_gguf(spec):  # llama.cpp's importance-matrix search (without data: its own, byte for byte); q4_0 /
        importance = None if options.disable_opt_rtn else importance  # q5_0: or optimised RTN, per block
        weight = linear.weight.detach()
        found = None if importance is None else gguf_legacy_start(weight, spec, importance)
        grid, start = found if found is not None else (None, None)
        return LayerStart(importance=importance, gguf_range=grid, gguf_start=start)
    if is_fp(spec):  # floating-point grids start from their full block ranges (alpha = beta = 1)
        return LayerStart(input_scale=calibrated_input_scale(spec, input_amax))
    if options.disable_opt_rtn:
        return LayerStart.of(plain_rtn_params(linear.weight.detach(), spec))
    return LayerStart.of(
        optimized_rtn_params(linear.weight.detach(), spec, importance, scale_dtype=options.scale_dtype)
    )


def _block_device(block: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    for p in block.parameters():
        return p.device
    return torch.device(default)


def placement(options: TuneOptions, block_device: torch.device) -> tuple[torch.device, torch.device]:
    """Where a block is tuned and where its cached streams live: the requested device (else where the block
    is); the cache on the host under ``low_gpu_mem_usage`` (one transfer per batch), else beside the block.
    With several devices (a list or a dict, :mod:`signround.placement`) the first is the one the block's inputs,
    outputs and loss live on; accelerate's hooks take each placed layer's computation to its own device."""
    if isinstance(options.device, (tuple, list, Mapping)):
        device = main_device(options.device)
    else:
        device = torch.device(options.device) if options.device else default_tuning_device(block_device)
    return device, torch.device("cpu") if options.low_gpu_mem_usage else device


def default_tuning_device(block_device: torch.device) -> torch.device:
    """``device_map=None``: where the block is, except that a block on the host of a machine with an accelerator
    is tuned on accelerator 0, as the reference's default ``device_map=0`` does.  Models are usually loaded on the
    host; tuning them there while a GPU sits idle beside it is never what a user asked for (``device_map="cpu"``
    asks for the host)."""
    if block_device.type != "cpu":
        return block_device
    accelerator = _host_accelerator()
    return block_device if accelerator is None else torch.device(accelerator.type, 0)


def _host_accelerator() -> torch.device | None:
    """This machine's accelerator type (CUDA, XPU, ...), or None."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.current_accelerator() if accelerator is not None and accelerator.is_available() else None


@dataclass
class BlockCheckpoint:
    """Where a block walk stands after a finished block: all a new process needs to continue it exactly.

    The two streams are the next block's inputs as this run computed them (the quantized stream comes from the
    tuned block's own candidate pass), so a resumed walk is bit-identical to an uninterrupted one.
    """

    next_block: int
    fp_hidden: torch.Tensor
    q_hidden: torch.Tensor
    report: TuneReport


def run(
    model: nn.Module,
    plan: QuantPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    options: TuneOptions,
    block_path: str | None = None,
    resume: BlockCheckpoint | None = None,
    on_block: Callable[[BlockCheckpoint], None] | None = None,
) -> TuneReport:
    """Tune and quantize every planned layer of ``model`` in place; returns the quantized tensors.

    The blocks at ``block_path`` (default: the text decoder) are walked with the calibration data; planned
    layers outside them (a vision tower under ``quant_nontext_module``) get optimised RTN, as no calibration
    stream reaches them.  After this call each planned Linear's weight holds its dequantized value (the model
    computes what the packed model will); packing into a format is the caller's next step.

    ``on_block`` receives a :class:`BlockCheckpoint` after every block; passing one back as ``resume`` skips the
    blocks it covers (their layers take its quantized values) and continues from its streams.
    """
    path, blocks = (block_path, model.get_submodule(block_path)) if block_path else find_blocks(model)
    report = TuneReport()
    was_training = model.training
    model.eval()
    torch.manual_seed(options.seed)
    spread = Spread.of(options)  # several tuning devices: each block spread by accelerate; None: one device
    dispatch: Dispatch | None = None
    try:
        with torch.no_grad():
            fp_inputs = capture_block_inputs(model, blocks[0], input_ids, attention_mask)
        q_inputs = fp_inputs
        start = 0
        if resume is not None:
            start, report = resume.next_block, resume.report
            fp_inputs = fp_inputs.with_hidden(resume.fp_hidden)
            q_inputs = fp_inputs.with_hidden(resume.q_hidden)
            for done in list(blocks)[:start]:
                if is_offloaded(done):
                    materialize(done, torch.device("cpu"))
            _set_dequantized(model, report.quantized)
            _set_norms(model, report.norms)
        bs = min(options.batch_size, len(fp_inputs))
        params_require_grad = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        bar = tqdm(total=len(blocks), initial=start, desc="signround", disable=not options.show_progress)
        for i, block in enumerate(blocks):
            if i < start:
                continue
            prefix = f"{path}.{i}."
            layers = {
                name: module
                for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and prefix + name in plan.layers
            }
            home = _block_device(block)
            if is_offloaded(block):  # low_cpu_mem_usage: its weights are on disk until now, then on the host
                home = torch.device("cpu")
                materialize(block, home)
            device, cache = placement(options, home)
            if spread is None:
                block.to(device)  # a no-op unless tuning elsewhere than the block lives (device_map)
            else:
                dispatch = spread.dispatch(block, prefix[:-1], set(layers), fp_inputs.hidden, cache, bs, home)
            fp_in, q_in = fp_inputs.placed(cache, device), q_inputs.placed(cache, device)
            # Before tuning, the optimised-RTN init weighs each input feature by its energy on the fp stream,
            # measured in the pass that computes the targets anyway (tuning then corrects for the quantized
            # stream).  Without tuning (iters=0) the quantized stream's energy is measured in its own pass.
            from_fp = layers and not options.disable_opt_rtn and options.iters > 0
            energy = _InputEnergy(layers) if from_fp else None
            try:
                with observing_experts(block) as moe:
                    fp_out = run_block(block, fp_in, bs)
            finally:
                importance = energy.close() if energy is not None else {}
            for name, experts in moe.items():
                for e, count in enumerate(experts.routed_tokens.tolist()):
                    report.expert_tokens[f"{prefix}{name}.{e}"] = count
                experts.routed_tokens.zero_()
            if not layers:
                q_out = fp_out if q_in is fp_in or not options.enable_quanted_input else run_block(block, q_in, bs)
                report.block_losses.append((None, None))
            else:
                result = _tune_one_block(block, layers, importance, prefix, plan, q_in, fp_out, options, bar, i)
                for name, qt in result.quantized.items():
                    report.quantized[prefix + name] = moved(qt, home)  # home with its block
                for name in result.norms:
                    report.norms[f"{prefix}{name}.weight"] = (
                        block.get_submodule(name).weight.detach().to("cpu", copy=True)
                    )
                report.block_losses.append((result.init_loss, result.final_loss))
                if not options.enable_quanted_input:
                    q_out = fp_out  # the stream the next block tunes on (its quantized outputs are not needed)
                elif result.outputs is not None:
                    q_out = result.outputs
                else:
                    q_out = run_block(block, q_in, bs)
                del result  # its quantized tensors are the report's now (and the packed block's, once packed)
                return_freed_memory()  # the loop's state, freed, leaves the process before packing allocates
            if dispatch is None:
                block.to(home)
            else:
                dispatch.release()  # hooks off, the block home
                dispatch = None
            fp_inputs = fp_in.with_hidden(fp_out)
            # without quantized inputs the fp stream feeds the next block's tuning too (the reference's
            # disable_quanted_input): each block then fits its own error, not its predecessors' as well
            q_inputs = q_in.with_hidden(q_out.to(cache)) if options.enable_quanted_input else fp_inputs
            bar.update(1)
            if on_block is not None:
                on_block(BlockCheckpoint(i + 1, fp_out, q_out, report))
        bar.close()
        if spread is not None:
            spread.close()
        _quantize_head(model, plan, q_inputs, fp_inputs.hidden, options, report)
        _quantize_unwalked(model, plan, options, report)
        if report.expert_tokens:
            idle = report.experts_without_tokens
            logger.info(
                "experts: %d of %d tuned on routed calibration tokens; %d got none (quantized from optimised RTN "
                "weighted by every token's inputs)%s",
                report.experts_on_data, len(report.expert_tokens), len(idle),
                f": {', '.join(idle[:8])}{' ...' if len(idle) > 8 else ''}" if idle else "",
            )  # fmt: skip
        for p, flag in params_require_grad.items():
            p.requires_grad_(flag)
    finally:
        if dispatch is not None:  # a block failed mid-tuning: no hooks left behind
            dispatch.release()
        model.train(was_training)
    return report


def _tune_one_block(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    importance: dict[str, torch.Tensor],
    prefix: str,
    plan: QuantPlan,
    q_in: BlockInputs,
    fp_out: torch.Tensor,
    options: TuneOptions,
    bar: tqdm,
    index: int,
) -> BlockResult:
    specs = {name: plan.layers[prefix + name] for name in layers}
    input_amax = None  # the static fp scales' statistic, on the quantized stream
    if not importance and not options.disable_opt_rtn:
        energy = _InputEnergy(layers)
        try:
            with observing_experts(block) as moe:
                run_block(block, q_in, min(options.batch_size, len(q_in)))
        finally:
            importance = energy.close()
        input_amax = energy.amax  # this pass saw the quantized stream already: no second one for the scales
        for experts in moe.values():
            experts.routed_tokens.zero_()
    if input_amax is None:
        input_amax = _static_input_amax(block, layers, specs, q_in, options)
    prepared = {
        name: (
            linear,
            specs[name],
            _layer_start(linear, specs[name], importance.get(name), options, input_amax.get(name)),
        )
        for name, linear in layers.items()
    }

    def progress(it: int, loss: float) -> None:
        if it % 10 == 0 or it == options.iters - 1:
            bar.set_postfix_str(f"block {index} iter {it} loss {loss:.3g}")

    with torch.enable_grad():
        result = tune_block(block, prepared, q_in, fp_out, options, progress, objective=block_objective(specs.values()))
    if result.init_loss is not None:
        logger.debug(
            "block %d: loss %.4g -> %.4g (best iter %s)", index, result.init_loss, result.final_loss, result.best_iter
        )
    return result


def _static_input_amax(
    block: nn.Module, layers: dict[str, nn.Linear], specs: dict[str, LayerSpec], q_in: BlockInputs, options: TuneOptions
) -> dict[str, torch.Tensor]:
    """The largest input magnitude of each layer whose scheme calibrates a static activation scale (FP8_STATIC,
    NVFP4's global scale), over the quantized stream's calibration inputs: one pass of the block before tuning."""
    static = {name: linear for name, linear in layers.items() if needs_input_scale(specs[name])}
    if not static:
        return {}
    seen = _InputEnergy(static)
    try:
        run_block(block, q_in, min(options.batch_size, len(q_in)))
    finally:
        seen.close()
    return seen.amax


def _quantize_head(
    model: nn.Module,
    plan: QuantPlan,
    q_inputs: BlockInputs,
    fp_hidden: torch.Tensor,
    options: TuneOptions,
    report: TuneReport,
) -> None:
    """lm_head (only when planned): optimised RTN weighted by the final normalised hidden states of the quantized
    stream, then (``iters > 0``) SignRound toward the full-precision model's logits (:mod:`.head`)."""
    name = head_name(model)
    if name is None or name not in plan.layers:
        return
    untie_head(model)  # (reads an offloaded head)
    head = model.get_submodule(name)
    spec = plan.layers[name]
    norm = final_norm(model) or nn.Identity()
    home = head.weight.device
    device, _cache = placement(options, home)  # where the blocks were tuned (the host head of a GPU run: the GPU)
    head.to(device)
    try:
        with torch.no_grad():
            q_normed = norm(q_inputs.hidden.to(_block_device(norm, device))).to(device)
        importance = amax = None
        if not options.disable_opt_rtn:
            x = q_normed.float()
            importance = x.reshape(-1, x.shape[-1]).square().mean(0)
            amax = x.abs().amax()
            del x
        start = _layer_start(head, spec, importance, options, amax)
        if options.iters == 0:
            qt = start.quantized(head.weight, spec, options.scale_dtype)
            with torch.no_grad():
                head.weight.copy_(dequantize_weight(qt, head.weight.dtype))
            report.quantized[name] = moved(qt, home)
            return
        with torch.no_grad():
            fp_normed = norm(fp_hidden.to(_block_device(norm, device))).to(device)
        result = tune_head(head, spec, start, q_normed, fp_normed, options)
    finally:
        head.to(home)
    report.quantized[name] = moved(result.quantized["head"], home)
    report.head_loss = (result.init_loss, result.final_loss)
    logger.info("%s: tuned toward the full-precision logits, loss %.4g -> %.4g", name, *report.head_loss)


@torch.no_grad()
def _set_dequantized(model: nn.Module, quantized: dict[str, Quantized]) -> None:
    """Each named layer's weight becomes its dequantized value (it computes what its packed layer will): layers
    quantized here, or in an earlier run that this one resumes."""
    for name, qt in quantized.items():
        linear = model.get_submodule(name)
        linear.weight.copy_(dequantize_weight(qt, linear.weight.dtype))


@torch.no_grad()
def _set_norms(model: nn.Module, norms: dict[str, torch.Tensor]) -> None:
    """Norm weights tuned in an earlier run that this one resumes, back into the model."""
    for name, value in norms.items():
        model.get_parameter(name).copy_(value)


@torch.no_grad()
def _quantize_unwalked(model: nn.Module, plan: QuantPlan, options: TuneOptions, report: TuneReport) -> None:
    """Planned layers no calibration stream reached (outside the walked blocks): optimised RTN, unweighted."""
    for name, spec in plan.layers.items():
        if name in report.quantized or name in report.packed:
            continue
        linear = model.get_submodule(name)
        qt = _layer_start(linear, spec, None, options).quantized(linear.weight, spec, options.scale_dtype)
        _set_dequantized(model, {name: qt})
        report.quantized[name] = qt
        logger.info("%s: outside the calibrated blocks, quantized with optimised RTN", name)


def untie_head(model: nn.Module) -> None:
    """Before the head is quantized: the embedding keeps its full-precision table, the head gets its own weight,
    and the config says untied (so the saved checkpoint reloads with a quantized head).  An offloaded head
    (``low_cpu_mem_usage``) is read first: its weight is on the meta device until then."""
    head = model.get_output_embeddings()
    if head is not None and is_offloaded(head):
        materialize(head, torch.device("cpu"))
    if not head_is_tied(model):
        return
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        config.tie_word_embeddings = False


@torch.no_grad()
def rtn_only(model: nn.Module, plan: QuantPlan, options: TuneOptions) -> TuneReport:
    """Plain RTN of every planned layer without calibration data (``iters=0, disable_opt_rtn=True``)."""
    report = TuneReport()
    if is_offloaded(model):  # low_cpu_mem_usage: no block walk here, so blocks left on "disk" are read now
        materialize(model, torch.device("cpu"))
    if head_name(model) in plan.layers:
        untie_head(model)  # else writing the dequantized head would overwrite the tied embedding table
    for name, spec in plan.layers.items():
        linear = model.get_submodule(name)
        report.quantized[name] = quantize_weight(linear.weight, spec, scale_dtype=options.scale_dtype)
        _set_dequantized(model, {name: report.quantized[name]})
    return report
