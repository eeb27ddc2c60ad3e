"""The quantization pipeline and the ``AutoRound`` Python API.

config -> plan -> calibration data -> tuning -> packed layers -> format on disk.  ``from_pretrained`` (through
the HfQuantizer), the ``AutoRound`` class and the CLI all run the same three functions below:
``plan_model``, ``quantize_model`` and ``pack_model``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import offload, runtime
from .config import AutoRoundConfig
from .data import load_calibration
from .gguf_export import gguf_can_hold, gguf_layer_config, write_gguf_model
from .layers import install_quantized
from .models import HEAD_NOT_TUNED, block_lists, find_blocks, inventory, quantizable_layers, to_linear, unfuse_experts
from .models.gguf_arch import check_gguf_supported
from .models.naming import checkpoint_name
from .packing.registry import Packer, format_packer
from .schemes import LayerSpec, QuantPlan, SkippedLayer, resolve_plan
from .tuning.block import TuneOptions, tunes_minmax
from .tuning.engine import TuneReport, rtn_only
from .tuning.engine import run as run_tuning
from .tuning.signsgd import run_learning_rates

logger = logging.getLogger(__name__)


def prepare_model(model: nn.Module, expert_names: str = "original") -> dict[str, Any]:
    """Make every quantizable weight an ``nn.Linear`` the later stages can tune and pack: fused MoE experts
    become per-expert Linear layers named as ``expert_names`` says (:mod:`signround.models.experts`).
    Idempotent."""
    return unfuse_experts(model, naming=expert_names)


def plan_model(model: nn.Module, config: AutoRoundConfig) -> QuantPlan:
    """Which layers to quantize and how, for every Linear-like weight of ``model`` (kept ones with their reason).

    Layers a requested format cannot hold stay in 16 bit (one warning); a plan that quantizes nothing is an error.
    Planned GPT-2-style Conv1D layers become nn.Linear here (a Conv1D is a transposed Linear).
    """
    default = config.default_spec()
    mixture = config.gguf_mixture()
    packers = [] if mixture else [format_packer(f, default) for f in config.formats()]

    def can_hold(spec: LayerSpec, in_features: int, out_features: int) -> str | None:
        if mixture:
            return gguf_can_hold(spec, in_features)
        for packer in packers:
            reason = packer.can_hold(spec, in_features, out_features)
            if reason:
                return reason
        return None

    if mixture:
        check_gguf_supported(model.config)  # a family llama.cpp cannot run is refused before any work
    prepare_model(model, config.moe_expert_names)
    inv = inventory(
        model,
        config.quant_lm_head,
        config.to_quant_block_names,
        config.quant_nontext_module,
    )
    layer_config, by_mixture = config.layer_config, {}
    if mixture:
        layer_config, by_mixture = gguf_layer_config(model, config, inv.candidates, mixture)
    plan = resolve_plan(inv.candidates, default, layer_config, can_hold, strict_keys=True, other_layers=inv.kept)
    for name, reason in by_mixture.items():  # kept in 16 bit by llama.cpp's own recipe: say so, with why
        if name in plan.kept:
            plan.kept.remove(name)
            inv.kept[name] = reason
    if default is not None and not plan.layers:
        reasons = sorted({s.reason for s in plan.skipped}) or ["no Linear-like layer inside its decoder blocks"]
        raise ValueError(f"no layer of {type(model).__name__} can be quantized with {default}: {'; '.join(reasons)}")
    to_linear(model, plan.layers)
    plan.skipped = [SkippedLayer(name, reason) for name, reason in inv.kept.items()] + plan.skipped
    _log_plan(model, plan, inv)
    return plan


def _log_plan(model: nn.Module, plan: QuantPlan, inv: Any) -> None:
    """One line before tuning: what is quantized out of the model's total, and every kept group with its reason."""
    quantized = sum(inv.numel.get(name, 0) for name in plan.layers)
    total = sum(p.numel() for p in model.parameters())
    by_reason: dict[str, int] = {}
    for skipped in plan.skipped:
        by_reason[skipped.reason] = by_reason.get(skipped.reason, 0) + 1
    kept = "; ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
    logger.info(
        "quantizing %d layers, %s of %s parameters (%.1f%%); kept in 16 bit: %s",
        len(plan.layers), _count(quantized), _count(total), 100.0 * quantized / max(total, 1), kept or "none",
    )  # fmt: skip
    shape_kept = [s for s in plan.skipped if s.name not in inv.kept]
    if shape_kept:
        logger.warning(
            "%d layers kept in 16 bit — %s", len(shape_kept), "; ".join(f"{s.name}: {s.reason}" for s in shape_kept)
        )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def tune_options(config: AutoRoundConfig, show_progress: bool = True) -> TuneOptions:
    """The tuning loop's knobs from ``config``; names a given ``minmax_lr`` that nothing will use."""
    default = config.default_spec()
    unused = config.iters and config.minmax_lr is not None and default is not None
    if unused and not tunes_minmax(config.enable_minmax_tuning, config.disable_opt_rtn, default):
        logger.warning(
            "minmax_lr=%g has no effect: the clipping of scheme %s stays where the start's search put it; "
            "pass enable_minmax_tuning=True to tune it",
            config.minmax_lr,
            config.scheme or default.data_type,
        )
    return TuneOptions(
        iters=config.iters,
        lr=config.lr,
        minmax_lr=config.minmax_lr,
        batch_size=config.batch_size,
        gradient_accumulate_steps=config.gradient_accumulate_steps,
        seed=config.seed,
        disable_opt_rtn=config.disable_opt_rtn,
        enable_torch_compile=config.enable_torch_compile,
        enable_norm_bias_tuning=config.enable_norm_bias_tuning,
        enable_minmax_tuning=config.enable_minmax_tuning,
        enable_quanted_input=config.enable_quanted_input,
        amp=config.amp,
        device=config.tuning_device(),
        low_gpu_mem_usage=config.low_gpu_mem_usage,
        max_memory=config.max_memory,
        show_progress=show_progress,
        # quantize_model packs each block as soon as it is tuned then (low_cpu_mem_usage); a GGUF file is written
        # whole at the end, so its blocks keep their dequantized weights like any other run
        write_back=not config.low_cpu_mem_usage or config.gguf_mixture() is not None,
    )


@dataclass
class QuantizationResult:
    plan: QuantPlan
    report: TuneReport
    shards: Any = None  # streaming.BlockShards of the blocks already written (low_cpu_mem_usage), or None


def quantize_model(
    model: nn.Module,
    tokenizer: Any,
    config: AutoRoundConfig,
    show_progress: bool = True,
    work_dir: str | os.PathLike | None = None,
    stream: bool = False,
) -> QuantizationResult:
    """Calibrate and tune ``model`` in place (its planned Linear weights end up dequantized).

    With ``work_dir`` every finished block is recorded there, and a run finding the records of an interrupted
    one (same model, config and data) continues after its last finished block (:mod:`signround.resume`).
    With ``stream`` too, under ``low_cpu_mem_usage`` and one format, each finished block is packed, written to
    its own shard in ``work_dir`` and released (:mod:`signround.streaming`): the model in memory then lacks
    those blocks, and only :meth:`AutoRound.save_quantized` in that format can follow.
    """
    plan = plan_model(model, config)
    if not plan.layers:
        return QuantizationResult(plan, TuneReport())
    options = tune_options(config, show_progress)
    options.lr, options.minmax_lr = _tuned_lrs(config, plan)  # one step for every block, the one recorded
    if config.iters == 0 and config.disable_opt_rtn:  # plain RTN needs no calibration data
        report = rtn_only(model, plan, options)
        offload.settle(model)
        return QuantizationResult(plan, report)
    calib = load_calibration(config.dataset, text_tokenizer(tokenizer), config.seqlen, config.nsamples, config.seed)
    block_path = find_blocks(model)[0]
    resume, on_block = None, None
    if work_dir is not None:
        from .resume import ResumeStore, fingerprint

        store = ResumeStore(Path(work_dir), fingerprint(model, _resumable_config(config), calib.input_ids))
        resume = store.load()
        known = set(resume.report.quantized) if resume else set()

        def on_block(checkpoint: Any) -> None:
            store.save(checkpoint, known)

    shards = None
    # A GGUF file is written whole at the end: its compact blocks stay in memory, the fp weights on disk.
    if config.low_cpu_mem_usage and config.gguf_mixture() is None:
        shards = _block_shards(model, config, work_dir, block_path) if stream else None
        if shards is not None and resume is not None:
            _release_streamed(model, config, shards, resume)
        on_block = _packing_each_block(model, config, on_block, shards)
    started = time.perf_counter()
    with runtime.deterministic_algorithms(config.enable_deterministic_algorithms):
        report = run_tuning(
            model, plan, calib.input_ids, calib.attention_mask, options, block_path, resume=resume, on_block=on_block
        )
    offload.settle(model)  # offloaded blocks (low_cpu_mem_usage, a "disk" device_map) are all in memory now
    logger.info("tuned %d layers in %s", report.layer_count, runtime.summary(started))
    return QuantizationResult(plan, report, shards)


def _packing_each_block(model: nn.Module, config: AutoRoundConfig, then: Any, shards: Any = None) -> Any:
    """``low_cpu_mem_usage``: a tuned block is packed at once (first format) and its full-precision Linear weights
    and quantized tensors are released; the packed layers carry them to the save.  With ``shards`` the packed
    block is written to its shard and released too (before its resume record, so a resumed run finds it)."""
    packer = format_packer(config.formats()[0], config.default_spec())

    def on_block(checkpoint: Any) -> None:
        report = checkpoint.report
        fresh = {n: qt for n, qt in report.quantized.items() if n not in report.packed}
        install_quantized(model, fresh, packer.name, config.backend)
        if shards is not None:
            shards.write(model, checkpoint.next_block - 1)
        if then is not None:
            then(checkpoint)  # resume records the block before its tensors are dropped
        for name in fresh:
            report.packed[name] = packer.name
            del report.quantized[name]
        if shards is not None:
            shards.release(model, checkpoint.next_block - 1)
        runtime.return_freed_memory()

    return on_block


def _block_shards(model: nn.Module, config: AutoRoundConfig, work_dir: Any, block_path: str) -> Any:
    """Where the streaming save writes its block shards, or None when it cannot stream (and why, logged)."""
    from .streaming import BlockShards

    if work_dir is None:
        return None
    if len(config.formats()) > 1:
        logger.info("several formats: packed blocks stay in memory until the save (streaming needs one format)")
        return None
    shards = BlockShards(Path(work_dir) / "shards", block_path)
    model._signround_block_shards = shards
    return shards


def _release_streamed(model: nn.Module, config: AutoRoundConfig, shards: Any, resume: Any) -> None:
    """A resumed streaming run: blocks whose shard the interrupted run wrote are not read again; their layers
    count as packed (the shard holds them) and their tensors stay off the host."""
    packing = format_packer(config.formats()[0], config.default_spec()).name
    blocks = model.get_submodule(shards.block_path)
    for index in range(resume.next_block):
        if not shards.file(index).is_file():
            continue
        prefix = shards.prefix(index)
        for name in [n for n in resume.report.quantized if n.startswith(prefix)]:
            resume.report.packed[name] = packing
            del resume.report.quantized[name]
        offload.detach(blocks[index])
        shards.release(model, index)
    if shards.streamed:
        logger.info("%d finished blocks are in their shards already: not read again", len(shards.streamed))


def _resumable_config(config: AutoRoundConfig) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every knob except where it runs (the kernel
    backend, the device); those may change between the two."""
    return {k: v for k, v in config.to_dict().items() if k != "backend"}


def pack_model(
    model: nn.Module, result: QuantizationResult, config: AutoRoundConfig, format_name: str | None = None
) -> Packer:
    """Swap the tuned Linear layers for QuantLinear layers in ``format_name``'s packing; describe it in ``config``."""
    format_name = format_name or config.formats()[0]
    default = config.default_spec()
    packer = format_packer(format_name, default)
    quantized = dict(result.report.quantized)
    for name, packing in result.report.packed.items():  # packed in place while tuning (low_cpu_mem_usage)
        if packing != packer.name:
            quantized[name] = model.get_submodule(name).quantized_tensor()
    install_quantized(model, quantized, packer.name, config.backend)
    describe_packed(model, config, result.plan, packer)
    return packer


def _tuned_lrs(config: AutoRoundConfig, plan: QuantPlan) -> tuple[float | None, float | None]:
    """``(lr, minmax_lr)`` the run uses (the automatic ones resolved from the narrowest layer ``plan``
    quantizes), for the tuning loop and for what the checkpoint records; without tuning, what was given."""
    if not config.iters or not plan.layers:
        return config.lr, config.minmax_lr if config.minmax_lr is not None else config.lr
    return run_learning_rates(config.lr, config.minmax_lr, config.iters, plan.layers.values())


def describe_packed(model: nn.Module, config: AutoRoundConfig, plan: QuantPlan, packer: Packer) -> None:
    """Make ``config`` (what save_pretrained writes) describe the packed model, in the format's own keys."""
    default = config.default_spec() or LayerSpec()
    overrides: dict[str, dict[str, Any]] = dict(plan.overrides())
    block_paths = [path for path, _ in block_lists(model, config.to_quant_block_names, config.quant_nontext_module)]
    in_blocks = tuple(f"{path}." for path in block_paths)
    # Layers of the quantized blocks left in 16 bit (routers, shapes, the user's) are named: the reference's loader
    # and serving engines expect packed tensors for every other layer there.  Layers outside the blocks are not.
    for name in [s.name for s in plan.skipped] + list(plan.kept):
        if name.startswith(in_blocks):
            overrides[name] = {"bits": 16}
    for name in plan.layers:  # quantized layers outside the blocks (lm_head) must be named, even if equal to default
        if not name.startswith(in_blocks):
            overrides.setdefault(name, {})
    for name in list(overrides):  # also under the checkpoint's spelling where transformers renames (see naming.py)
        on_disk = checkpoint_name(model, name)
        if on_disk != name:
            overrides.setdefault(on_disk, overrides[name])
    lr, minmax_lr = _tuned_lrs(config, plan)
    extra = {
        "iters": config.iters,
        "lr": lr,
        "minmax_lr": minmax_lr,
        "nsamples": config.nsamples,
        "seqlen": config.seqlen,
        "batch_size": config.batch_size,
        "gradient_accumulate_steps": config.gradient_accumulate_steps,
        "amp": config.amp,
        # what the tuning did (the reference's keys; its defaults True / False are left out of the file)
        "enable_minmax_tuning": tunes_minmax(config.enable_minmax_tuning, config.disable_opt_rtn, default)
        if config.iters
        else None,
        "enable_norm_bias_tuning": config.enable_norm_bias_tuning if config.iters else None,
        "enable_quanted_input": config.enable_quanted_input,  # iters=0 too: the stream its importance is read on
        "dataset": config.dataset if isinstance(config.dataset, str) else "custom",
        "block_name_to_quantize": ",".join(block_paths),
        "quant_lm_head": config.quant_lm_head or None,
        "signround_version": _version(),
    }
    config.set_packed(packer.quantization_config(default, overrides, extra))
    model.config.quantization_config = config


def packed_bytes(directory: Path, tensor_names: tuple[str, ...]) -> tuple[int, int]:
    """Bytes of a saved checkpoint's packed-layer tensors (``*.qweight``, ``*.scales``, ...) and of all tensors,
    read from the safetensors headers."""
    from .streaming import tensor_bytes

    packed = total = 0
    for file in sorted(Path(directory).glob("*.safetensors")):
        for name, nbytes in tensor_bytes(file).items():
            total += nbytes
            if name.rpartition(".")[2] in tensor_names:
                packed += nbytes
    return packed, total


def _version() -> str:
    from . import __version__

    return __version__


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Fail before any long work if ``output_dir`` cannot be created or written."""
    out = Path(output_dir).expanduser().resolve()
    parent = out.parent
    probe_dir = parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NotADirectoryError(
            f"output directory {str(out)!r} cannot be created: {str(probe_dir)!r} is not a directory"
        )
    if not os.access(probe_dir, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"output directory {str(out)!r} is not writable")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {str(out)!r} exists and is not a directory")
    return out


def atomic_save(output_dir: str | os.PathLike, write: Any) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` to ``output_dir`` in one rename; on failure nothing is left.

    An existing ``output_dir`` is replaced only once the new one is complete.
    """
    out = check_output_dir(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_image_text_to_text(path: str, trust_remote_code: bool) -> bool:
    """Vision-language checkpoints load with their own Auto class (``AutoModelForImageTextToText``)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


def _load_model(path: str, trust_remote_code: bool, dtype: Any, low_cpu_mem_usage: bool = False) -> nn.Module:
    """The model of ``path``; with ``low_cpu_mem_usage`` its decoder blocks stay on disk (accelerate's offload,
    read from the checkpoint's shards when their turn comes: :mod:`signround.offload`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if _is_image_text_to_text(path, trust_remote_code) else AutoModelForCausalLM
    if not low_cpu_mem_usage:
        return auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    from .offload import offload_device_map

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    device_map = offload_device_map(skeleton, find_blocks(skeleton)[0])
    offload_folder = tempfile.mkdtemp(prefix="signround-offload-")  # used only for tensors transformers converts
    return auto.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map, offload_folder=offload_folder
    )


def _load_tokenizer(path: str, trust_remote_code: bool, multimodal: bool) -> Any:
    """The tokenizer, or for a vision-language model its processor (saved with the output so it reloads whole)."""
    from transformers import AutoProcessor, AutoTokenizer

    if multimodal:
        try:
            return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as err:
            logger.warning("no processor loads from %s (%s); saving the tokenizer only", path, err)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def text_tokenizer(tokenizer: Any) -> Any:
    """A processor's tokenizer (calibration is text), or the tokenizer itself."""
    return getattr(tokenizer, "tokenizer", tokenizer)


class AutoRound:
    """The reference tool's Python API.

    >>> ar = AutoRound("path/to/model", scheme="W4A16", group_size=32, iters=50, dataset="calib.txt")
    >>> ar.quantize_and_save("out", format="auto_round")
    """

    def __init__(
        self,
        model: nn.Module | str,
        tokenizer: Any = None,
        scheme: str = "W4A16",
        *,
        trust_remote_code: bool = False,
        dtype: Any = "auto",
        show_progress: bool = True,
        **kwargs: Any,
    ):
        self.config = AutoRoundConfig(scheme=scheme, **kwargs)  # validates everything before loading anything
        if isinstance(model, (str, os.PathLike)):
            path = str(model)
            self.model = _load_model(path, trust_remote_code, dtype, self.config.low_cpu_mem_usage)
            if tokenizer is None:
                multimodal = self.config.tokenizer is None and _is_image_text_to_text(path, trust_remote_code)
                tokenizer = _load_tokenizer(self.config.tokenizer or path, trust_remote_code, multimodal)
        else:
            self.model = model
        self.tokenizer = tokenizer
        self.show_progress = show_progress
        self.result: QuantizationResult | None = None
        # Figures measured on the quantized model (e.g. {"wikitext ppl": 12.3}); written into the model card.
        self.metrics: dict[str, float] = {}

    @classmethod
    def from_quantized(cls, model: nn.Module | str, tokenizer: Any = None, **kwargs: Any) -> AutoRound:
        """Wrap an already-quantized model (any checkpoint signround loads: auto-round, GPTQ, AWQ,
        compressed-tensors) so ``save_quantized(out, format=...)`` re-packs it into other formats, no re-tuning.

        ``model`` is a loaded model holding QuantLinear layers, or a checkpoint directory.
        """
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(model)
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig())
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        result = _result_from_layers(model)
        default = _most_common(list(result.plan.layers.values()))
        ar = cls(model, tokenizer, bits=default.bits, group_size=default.group_size, sym=default.sym, iters=0, **kwargs)
        ar.result = result
        return ar

    def quantize(
        self, *, work_dir: str | os.PathLike | None = None, stream: bool = False
    ) -> tuple[nn.Module, dict[str, LayerSpec]]:
        """Tune the model in place; returns it and the per-layer specs (the reference returns model, layer_config).

        ``work_dir``: record each finished block there and resume an interrupted run found there
        (``quantize_and_save`` and the CLI use the output directory's, see :func:`signround.resume.work_dir_for`).
        ``stream`` (with ``work_dir`` and ``low_cpu_mem_usage``): write each packed block to a shard there and
        release it; the next call must then be :meth:`save_quantized` (the blocks are no longer in memory).
        """
        self.result = quantize_model(self.model, self.tokenizer, self.config, self.show_progress, work_dir, stream)
        return self.model, dict(self.result.plan.layers)

    def save_quantized(self, output_dir: str | os.PathLike, format: str | None = None, inplace: bool = True) -> Path:
        """Pack and write the model, its config and tokenizer to ``output_dir`` atomically.

        Several formats (``"auto_round,auto_gptq"``) are written from the same tuned tensors, one sub-directory
        per format (``output_dir/auto_round``, ...); the model in memory ends up packed in the last one.
        """
        if self.result is None:
            raise RuntimeError("call quantize() before save_quantized()")
        if not inplace:
            raise NotImplementedError("inplace=False is not supported yet; the model is packed in place")
        formats = [f.strip().lower() for f in (format or self.config.format).split(",") if f.strip()]
        if not formats:
            raise ValueError(f"format must name at least one format, got {format!r}")
        mixture = self.config.gguf_mixture()
        if mixture is not None and formats != self.config.formats():
            raise ValueError(
                f"the layers were tuned toward gguf:{mixture}'s types; save in format 'gguf:{mixture}', not "
                f"{','.join(formats)!r} (another GGUF type or format needs its own run)"
            )
        for name in formats if mixture is None else ():
            format_packer(name, self.config.default_spec())  # unknown format: fail before writing anything
        shards = self.result.shards
        if shards is not None and shards.streamed and formats != self.config.formats():
            raise ValueError(
                f"the blocks were streamed to disk in format {self.config.formats()[0]!r} while tuning "
                f"(low_cpu_mem_usage); save in that format, not {','.join(formats)!r}"
            )
        if shards is not None and shards.finished:
            raise RuntimeError("the streamed blocks were already saved into an output; load that output")

        def write(tmp: Path) -> None:
            for name in formats:
                target = tmp / name if len(formats) > 1 else tmp
                target.mkdir(parents=True, exist_ok=True)
                self._write_format(target, name)

        return atomic_save(output_dir, write)

    def _write_format(self, target: Path, format_name: str) -> None:
        mixture = self.config.gguf_mixture()
        if mixture is not None:
            plan = self.result.plan
            # an untuned head is not kept: llama-quantize gives it its recipe type, and so does the writer
            kept = plan.kept + [s.name for s in plan.skipped if s.reason != HEAD_NOT_TUNED]
            path = write_gguf_model(target, self.model, self.tokenizer, self.result.report.quantized, kept, mixture)
            logger.info("saved %s (%s)", path.name, _count(path.stat().st_size) + "B")
            self._model_card(format_name).save(target / "README.md")
            return
        self.config.format = format_name
        pack_model(self.model, self.result, self.config, format_name)
        _attach_quantizer(self.model, self.config)
        self.model.save_pretrained(target)
        if self.result.shards is not None and self.result.shards.streamed:
            self.result.shards.finish(target)  # the blocks written while tuning join transformers' own file
            self.result.shards.refuse_released(self.model)
        packed, total = packed_bytes(target, format_packer(format_name, self.config.default_spec()).tensor_names)
        logger.info(
            "saved %s: %.1f%% of the checkpoint's %s bytes are quantized tensors", format_name,
            100.0 * packed / max(total, 1), _count(total),
        )  # fmt: skip
        # The reference also writes the quantization config on its own (vLLM looks for this file).
        (target / "quantization_config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(target)
        self._model_card(format_name).save(target / "README.md")

    def _model_card(self, format_name: str) -> Any:
        from .hub import model_card

        c = self.config
        dataset = c.dataset if isinstance(c.dataset, str) else "custom"
        tuning = {
            "scheme": c.scheme, "bits": c.bits, "group_size": c.group_size, "sym": c.sym, "iters": c.iters,
            "lr": _tuned_lrs(c, self.result.plan)[0] if self.result else c.lr, "nsamples": c.nsamples,
            "seqlen": c.seqlen, "batch_size": c.batch_size, "calibration dataset": dataset, "format": format_name,
            "quantized layers": self.result.report.layer_count if self.result else None,
        }  # fmt: skip
        base = getattr(self.model, "name_or_path", None) or getattr(self.model.config, "_name_or_path", None)
        return model_card(base, c.to_dict(), format_name, tuning, self.metrics)

    def quantize_and_save(
        self,
        output_dir: str | os.PathLike = "tmp_autoround",
        format: str | None = None,
        inplace: bool = True,
        push_to_hub: str | None = None,
        private: bool | None = None,
        token: str | None = None,
    ) -> Path:
        """Tune, then write ``output_dir`` (one sub-directory per format when several are given); with
        ``push_to_hub="user/repo"`` also upload it (several formats: ``user/repo-<format>`` each).  ``format``
        defaults to the one given at construction (``"auto_round"`` unless a GGUF scheme or format was named).

        The folder is complete on disk before any upload starts, so a failed upload loses nothing locally.
        """
        from .resume import work_dir_for

        check_output_dir(output_dir)
        format = format or self.config.format
        self.config.format = format
        self.config.validate()  # unknown format, or a scheme a format cannot hold: fail before tuning
        work_dir = work_dir_for(output_dir)
        self.quantize(work_dir=work_dir, stream=True)
        out = self.save_quantized(output_dir, format, inplace)
        shutil.rmtree(work_dir, ignore_errors=True)  # the output is complete: nothing left to resume
        if push_to_hub:
            self.push_to_hub(out, push_to_hub, private=private, token=token)
        return out

    def push_to_hub(
        self, saved_dir: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None
    ) -> list[str]:
        """Upload what :meth:`save_quantized` wrote; returns the commit URLs."""
        from .hub import push_folder

        formats = self.config.formats()
        if len(formats) == 1:
            return [push_folder(saved_dir, repo_id, private=private, token=token)]
        return [push_folder(Path(saved_dir) / f, f"{repo_id}-{f}", private=private, token=token) for f in formats]


def _result_from_layers(model: nn.Module) -> QuantizationResult:
    """The quantized tensors and plan of a model that already holds QuantLinear layers."""
    from .layers import quant_linears

    layers = quant_linears(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no quantized layer; quantize it first (AutoRound(...))")
    report = TuneReport(quantized={name: layer.quantized_tensor() for name, layer in layers.items()})
    specs = {name: qt.spec for name, qt in report.quantized.items()}
    plan = QuantPlan(layers=specs, default=_most_common(list(specs.values())))
    # Linear layers of the blocks that the source left in 16 bit stay so (formats must name them).
    plan.skipped = [SkippedLayer(name, "unquantized in the source") for name, _i, _o in quantizable_layers(model)]
    return QuantizationResult(plan, report)


def _most_common(specs: list[LayerSpec]) -> LayerSpec:
    return Counter(specs).most_common(1)[0][0]


def _attach_quantizer(model: nn.Module, config: AutoRoundConfig) -> None:
    """A model packed outside from_pretrained gets the quantizer transformers' save_pretrained expects."""
    from .hf_quantizer import SignRoundHfQuantizer

    model.hf_quantizer = SignRoundHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
