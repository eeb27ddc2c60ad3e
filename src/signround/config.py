"""``AutoRoundConfig``: every user-facing knob, validated when the config is built.

It is a Transformers ``QuantizationConfigMixin`` with ``quant_method = "auto-round"``: passed to
``from_pretrained`` it makes the model quantize while loading; written to ``config.json`` (``to_dict``) it
describes the packed model in the reference tool's keys, so Intel's loaders, vLLM and SGLang read it;
read back (``from_dict``) it rebuilds the packed layers.  Unknown keys from a checkpoint are kept and
written back unchanged.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from .models.families import EXPERT_NAMINGS
from .schemes import (
    FP_DATA_TYPES,
    GGUF_SCHEME_PREFIX,
    KEEP_16_BIT,
    SUPPORTED_BITS,
    SUPPORTED_DATA_TYPES,
    LayerSpec,
    gguf_mixture_of,
    gguf_type_of,
    keeps_16_bit,
    layer_override,
    scheme_fields,
    scheme_names,
)

logger = logging.getLogger(__name__)

QUANT_METHOD = "auto-round"
DEFAULT_DATASET = "NeelNanda/pile-10k"

# The reference's recipes (user guide, "各配置方案详细参数"); lr None = automatic (0.25 / max(iters, 50) below 1000
# iterations, twice that for int <= 2 bits; see tuning.signsgd.default_lr).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"batch_size": 8, "iters": 200, "seqlen": 2048, "nsamples": 128, "lr": None},
    "best": {"batch_size": 8, "iters": 1000, "seqlen": 2048, "nsamples": 512, "lr": None},
    "light": {"batch_size": 8, "iters": 50, "seqlen": 2048, "nsamples": 128, "lr": 5e-3},
}

# Knobs that only matter while quantizing; the rest describe the packed checkpoint.
_TUNING_KEYS = (
    "iters", "lr", "minmax_lr", "nsamples", "seqlen", "batch_size", "gradient_accumulate_steps",
    "seed", "disable_opt_rtn", "enable_torch_compile", "amp", "enable_norm_bias_tuning", "enable_minmax_tuning",
    "enable_quanted_input",
)  # fmt: skip


_ACCEPTED_DEVICE_MAPS = (
    "accepted: None, 'auto', 'cpu', an accelerator index (0) or device ('cuda:1', 'xpu'), several devices "
    "('0,1', 'cuda:0,cuda:1', '0,cpu', a list) or a dict {layer name or pattern: device}"
)


def _is_pattern(key: str) -> bool:
    try:
        re.compile(key)
    except re.error:
        return False
    return True


def _warn_unused(keys: Mapping[str, Any]) -> None:
    """Arguments this config does not act on are kept (and saved, as transformers keeps a config's extra keys) but
    change nothing: say so, with the known argument a typo most likely meant."""
    known = [name for name in inspect.signature(AutoRoundConfig.__init__).parameters if name not in ("self", "kwargs")]
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        logger.warning(
            "AutoRoundConfig does not use %r: kept in the saved config only, it changes nothing%s", key, hint
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name_list(value: Any, what: str) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (the reference takes comma-separated strings; lists are kinder)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    _require(
        isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items),
        f"{what} must be a comma-separated string or a list of strings, got {value!r}",
    )
    return [item.strip() for item in items if item.strip()]


def _check_dataset_spec(dataset: str) -> None:
    """Syntax of a dataset spec and existence of its local files, before any model is loaded."""
    from pathlib import Path

    from .data import parse_dataset_spec
    from .data.sources import looks_like_hub_name

    for spec in parse_dataset_spec(dataset):
        if not Path(spec.name).expanduser().exists() and not looks_like_hub_name(spec.name):
            raise FileNotFoundError(f"calibration dataset {spec.name!r} does not exist (from dataset={dataset!r})")


def _gguf_scheme_and_format(scheme: str, format: str, explicit: tuple[Any, ...]) -> tuple[str, str]:
    """The reference's coupling of GGUF schemes and formats: ``format="gguf:q4_k_m"`` alone sets that scheme,
    ``scheme="gguf:q4_k_m"`` alone that format; two different GGUF types are refused."""
    first_format = format.split(",")[0].strip()
    scheme_mixture, format_mixture = gguf_mixture_of(scheme), gguf_mixture_of(first_format)
    if first_format.lower().startswith(GGUF_SCHEME_PREFIX.lower()) and format_mixture is None:
        from .quant.gguf_mixtures import mixture_names

        raise ValueError(f"unknown GGUF format {first_format!r}; accepted: {['gguf:' + n for n in mixture_names()]}")
    if scheme_mixture and format_mixture and scheme_mixture != format_mixture:
        raise ValueError(f"scheme={scheme!r} and format={format!r} name different GGUF types; pass one of them")
    if scheme_mixture and format.strip().lower() == "auto_round":
        return scheme, f"gguf:{scheme_mixture}"
    if format_mixture and scheme.upper() == "W4A16" and all(v is None for v in explicit):
        return GGUF_SCHEME_PREFIX + format_mixture.upper(), format
    return scheme, format


class AutoRoundConfig(QuantizationConfigMixin):
    """Configuration of SignRound quantization (and of loading its checkpoints).

    Args mirror the reference tool's API.  ``scheme`` (e.g. ``"W4A16"``) sets bits / group_size / sym;
    explicitly passed ``bits``, ``group_size`` or ``sym`` override it.  ``iters=0`` gives (optimised)
    RTN; ``disable_opt_rtn=True`` gives plain RTN.  ``amp`` runs the tuning loop's block in bf16 where the
    device has native bf16 (CUDA, CPUs with AVX512-BF16/AMX), as the reference does; the fake quantizer's
    float32 weights, the targets and the loss stay float32.  ``enable_torch_compile`` runs each block's loop
    under torch.compile with the fake quantizer's fused kernels: ``None`` (default) where it pays for the
    compile (blocks of 2 M tuned weights or more, 20 iterations or more, one CPU or CUDA device, no experts),
    ``True`` / ``False`` always / never; a block torch.compile fails on is tuned eagerly, with a warning.
    ``enable_norm_bias_tuning`` (default on, unlike the reference) tunes each block's norm weights along with the
    rounding (by at most half a step of the scheme's grid over each norm weight's range; they stay in 16 bit);
    Linear biases are not tuned.  ``enable_minmax_tuning`` tunes each group's clipping factors (its scale and
    zero) with the rounding: ``None`` (default) only where no search placed them (plain-RTN starts with
    ``disable_opt_rtn=True``, the fp grids' full block ranges); optimised RTN's clipping on integer grids and
    llama.cpp's importance-weighted scale search on the GGUF ones are kept, as the models came out closer to the fp
    one with only the rounding (and the norms) tuned (docs/benchmarks.md); ``True`` / ``False`` everywhere / nowhere.
    ``enable_quanted_input`` (default on, as the reference) tunes each block on the outputs of the blocks already
    quantized, so it also makes up for their error on the calibration text; ``False`` tunes every block on the fp
    model's own inputs, fitting only its own error (the reference's ``disable_quanted_input``; what each does on
    calibration text unlike the model's use: docs/benchmarks.md, "What tuning does to the blocks it tunes").

    Per-layer control, with the reference's names:

    - ``layer_config`` maps a key to a scheme name (``"W8A16"``), a dict of LayerSpec fields, or ``16`` /
      ``"BF16"`` / ``{"bits": 16}`` (keep the layer in 16 bit).  A key is an exact layer name, a name fragment
      (``"k_proj"``: every layer whose name contains it), a shell wildcard (``"*.self_attn.k_proj"``) or a regular
      expression (``"layers[.][0-3][.]mlp"``), searched in the layer names like the reference does
      (``schemes.key_matches``).
    - Precedence for one layer: the key equal to its name wins; otherwise the *first* matching key in dict
      order (as the reference's checkpoint loader does), so put specific patterns before general ones.
    - ``ignore_layers`` (``"lm_head,mlp.gate"`` or a list; ``fp_layers`` is the older name of the same) keeps the
      layers they match in 16 bit.  They become ``{"bits": 16}`` entries appended *after* ``layer_config``'s own
      (a key already in ``layer_config`` keeps its value), so ``layer_config`` wins over them except where an
      ignore entry is an exact layer name and the ``layer_config`` key only a pattern (exact beats patterns).
    - A key that matches no layer of the model is an error when planning, listing the closest layer names.
    - ``to_quant_block_names`` (``"model.language_model.layers"`` or a list; ``None`` = found automatically) names
      the decoder block lists to tune; ``quant_nontext_module`` also quantizes vision / audio towers' blocks.
    - ``moe_expert_names`` names quantized MoE experts on disk: ``"original"`` (default) as the family's original
      checkpoint does (Mixtral ``w1 / w2 / w3``: what vLLM and SGLang read), ``"gate_up_down"`` always
      ``gate_proj / up_proj / down_proj`` (what Intel auto-round 0.16.1's and GPTQModel's loaders expect).

    ``low_cpu_mem_usage`` (on by default, as in the reference): a model loaded from a path keeps its blocks on
    disk until their turn, each tuned block is packed at once, and ``quantize_and_save`` streams it to the output
    and releases it, so ``ar.model`` no longer runs after that save (load the output).  The tensors written are
    the same with it off; turn it off to keep the whole model in memory (its tuned tensors in
    ``ar.result.report.quantized``).
    """

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        scheme: str = "W4A16",
        iters: int = 200,
        lr: float | None = None,
        minmax_lr: float | None = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        batch_size: int = 8,
        gradient_accumulate_steps: int = 1,
        dataset: Any = DEFAULT_DATASET,
        seed: int = 42,
        layer_config: Mapping[str, Any] | None = None,
        ignore_layers: str | list[str] | None = None,
        fp_layers: str | list[str] | None = None,
        to_quant_block_names: str | list[str] | None = None,
        quant_nontext_module: bool = False,
        moe_expert_names: str = "original",
        quant_lm_head: bool = False,
        format: str = "auto_round",
        backend: str = "auto",
        enable_torch_compile: bool | None = None,
        enable_norm_bias_tuning: bool = True,
        enable_minmax_tuning: bool | None = None,
        enable_quanted_input: bool = True,
        disable_opt_rtn: bool = False,
        amp: bool = True,
        device_map: str | int | None = None,
        low_gpu_mem_usage: bool = False,
        max_memory: Mapping[Any, int | str] | None = None,
        low_cpu_mem_usage: bool = True,
        enable_deterministic_algorithms: bool = False,
        tokenizer: str | None = None,
        data_type: str | None = None,
        act_bits: int | None = None,
        act_data_type: str | None = None,
        act_group_size: int | None = None,
        act_dynamic: bool | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        _require(
            quant_method in (QUANT_METHOD, "intel/auto-round"),
            f"quant_method={quant_method!r} is not an AutoRound config; expected {QUANT_METHOD!r}",
        )
        _require(isinstance(scheme, str), f"scheme must be a string, got {scheme!r}; accepted: {scheme_names()}")
        _require(isinstance(format, str), f"format must be a string, got {format!r}")
        scheme, format = _gguf_scheme_and_format(scheme, format, (bits, group_size, sym, data_type))
        fields = scheme_fields(scheme)  # raises on an unknown scheme, listing the accepted ones
        self.scheme = scheme.upper()
        base = fields or {"bits": 16, "group_size": 128, "sym": True}
        self.bits = base["bits"] if bits is None else bits
        self.group_size = base["group_size"] if group_size is None else group_size
        if isinstance(self.group_size, list):  # FP8_BLOCK's (128, 128) read back from JSON
            self.group_size = tuple(self.group_size)
        self.sym = base["sym"] if sym is None else sym
        self.data_type = base.get("data_type", "int") if data_type is None else data_type
        # activation fields: the scheme's (16 bit unless an fp scheme quantizes them), each overridable
        act_defaults = LayerSpec()
        act_given = {"act_bits": act_bits, "act_data_type": act_data_type, "act_group_size": act_group_size}
        for key, value in {**act_given, "act_dynamic": act_dynamic}.items():
            setattr(self, key, base.get(key, getattr(act_defaults, key)) if value is None else value)
        self.iters = iters
        self.lr = lr
        self.minmax_lr = minmax_lr
        self.nsamples = nsamples
        self.seqlen = seqlen
        self.batch_size = batch_size
        self.gradient_accumulate_steps = gradient_accumulate_steps
        self.dataset = dataset
        self.seed = seed
        _require(
            layer_config is None or isinstance(layer_config, Mapping),
            f"layer_config must be a dict, got {type(layer_config).__name__}",
        )
        self.ignore_layers = [*_name_list(ignore_layers, "ignore_layers"), *_name_list(fp_layers, "fp_layers")]
        # ignore_layers come after the user's own entries: those win (see the class docstring).
        self.layer_config = dict(layer_config or {})
        for name in self.ignore_layers:
            self.layer_config.setdefault(name, dict(KEEP_16_BIT))
        self.to_quant_block_names = _name_list(to_quant_block_names, "to_quant_block_names") or None
        self.quant_nontext_module = quant_nontext_module
        self.moe_expert_names = moe_expert_names
        self.quant_lm_head = quant_lm_head
        self.format = format
        self.backend = backend
        self.enable_torch_compile = enable_torch_compile
        self.enable_norm_bias_tuning = enable_norm_bias_tuning
        self.enable_minmax_tuning = enable_minmax_tuning
        self.enable_quanted_input = enable_quanted_input
        self.disable_opt_rtn = disable_opt_rtn
        self.amp = amp
        self.device_map = kwargs.pop("device", None) if device_map is None else device_map  # the reference's old name
        self.low_gpu_mem_usage = low_gpu_mem_usage
        self.max_memory = dict(max_memory) if isinstance(max_memory, Mapping) else max_memory
        self.low_cpu_mem_usage = low_cpu_mem_usage
        self.enable_deterministic_algorithms = enable_deterministic_algorithms
        self.tokenizer = tokenizer
        # What a checkpoint says about itself (packing layout, per-layer overrides, block names, ...).
        self.packing_format: str | None = kwargs.pop("packing_format", None)
        self.extra_config: dict[str, dict[str, Any]] = dict(kwargs.pop("extra_config", None) or {})
        self.block_name_to_quantize = kwargs.pop("block_name_to_quantize", None)
        # A config read back from a saved model describes it; its dataset is history, not something to open.
        self._check_dataset = not kwargs.pop("_from_saved", False)
        self.unknown_keys: dict[str, Any] = dict(kwargs)
        if self.unknown_keys and self._check_dataset:  # a caller's own arguments, not a checkpoint's extra keys
            _warn_unused(self.unknown_keys)
        # The exact description of a packed model (a checkpoint's dict, or what packing produced); None
        # while the config only says how to quantize.
        self.packed: dict[str, Any] | None = None
        self.validate()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """A checkpoint's ``quantization_config``: the config describes that packed model, kept verbatim.  A scheme
        signround cannot run goes to Intel auto-round's loader (:mod:`signround.handoff`)."""
        try:
            config = cls(**{**config_dict, **kwargs, "_from_saved": True})
        except ValueError as error:
            from .handoff import foreign_config

            foreign = foreign_config(dict(config_dict), error)
            return (foreign, {}) if return_unused_kwargs else foreign
        config.packed = copy.deepcopy(dict(config_dict))
        return (config, {}) if return_unused_kwargs else config

    @classmethod
    def from_checkpoint(cls, description: Mapping[str, Any]) -> AutoRoundConfig:
        """A config describing any checkpoint signround loads (auto-round, gptq, awq, compressed-tensors).

        The description is kept verbatim, so re-saving writes the checkpoint's own quantization_config.
        """
        if description.get("quant_method") in (QUANT_METHOD, "intel/auto-round"):
            return cls.from_dict(dict(description))
        from .convert import read_checkpoint_config

        default = read_checkpoint_config(description).default  # raises naming what is not loadable
        fields = default.to_dict()  # fp checkpoints (compressed-tensors' fp formats): data_type and act_* too
        config = cls(**fields, _from_saved=True)
        config.packed = copy.deepcopy(dict(description))
        return config

    def set_packed(self, description: dict[str, Any]) -> None:
        """Record what the packed model is (the format's config body); ``to_dict`` then returns exactly that."""
        self.packed = copy.deepcopy(description)
        self.packing_format = description.get("packing_format")
        self.extra_config = copy.deepcopy(description.get("extra_config") or {})
        self.block_name_to_quantize = description.get("block_name_to_quantize")

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value and what is accepted."""
        _require(
            self.data_type in SUPPORTED_DATA_TYPES,
            f"data_type={self.data_type!r} is not supported; accepted: {list(SUPPORTED_DATA_TYPES)}",
        )
        gguf = gguf_type_of(self.data_type)
        _require(
            self.bits in (*SUPPORTED_BITS, 16) or (gguf is not None and self.bits == gguf.bits),
            f"bits={self.bits!r} is not supported; accepted: {list(SUPPORTED_BITS)}",
        )
        _require(
            self.data_type in FP_DATA_TYPES
            or (_is_int(self.group_size) and (self.group_size > 0 or self.group_size == -1)),
            f"group_size={self.group_size!r} is not supported; accepted: a positive integer (e.g. 32, 64, 128) or -1 (per channel)",
        )
        _require(isinstance(self.sym, bool), f"sym must be True or False, got {self.sym!r}")
        if gguf is not None:
            LayerSpec(**self.default_spec_fields())  # a GGUF type fixes bits / group_size / sym: names a mismatch
        if self.bits < 16:  # the activation fields and fp weight grids are checked together, naming what is accepted
            LayerSpec(**self.default_spec_fields())
        else:
            _require(self.act_bits == 16, f"act_bits={self.act_bits!r} needs quantized weights (bits < 16)")
        _require(
            _is_int(self.iters) and self.iters >= 0, f"iters must be an integer >= 0 (0 = RTN), got {self.iters!r}"
        )
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                f"{name} must be a positive number or None (automatic), got {value!r}",
            )
        for name in ("nsamples", "seqlen", "batch_size", "gradient_accumulate_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _require(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        self.tuning_device()  # raises naming the accepted forms
        _require(
            self.enable_torch_compile in (None, True, False),
            f"enable_torch_compile must be None (where it pays: large blocks), True or False, got "
            f"{self.enable_torch_compile!r}",
        )
        _require(
            self.max_memory is None
            or (isinstance(self.max_memory, dict) and all(isinstance(v, (int, str)) for v in self.max_memory.values())),
            f"max_memory={self.max_memory!r} is not supported; accepted: None or a dict like "
            "{0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's form)",
        )
        for name in (
            "quant_lm_head", "quant_nontext_module", "disable_opt_rtn", "amp", "enable_norm_bias_tuning",
            "enable_quanted_input", "low_gpu_mem_usage", "low_cpu_mem_usage", "enable_deterministic_algorithms",
        ):  # fmt: skip
            _require(
                isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}"
            )
        _require(
            self.enable_minmax_tuning is None or isinstance(self.enable_minmax_tuning, bool),
            f"enable_minmax_tuning must be None (automatic), True or False, got {self.enable_minmax_tuning!r}",
        )
        _require(
            self.moe_expert_names in EXPERT_NAMINGS,
            f"moe_expert_names={self.moe_expert_names!r} is not supported; accepted: {list(EXPERT_NAMINGS)}",
        )
        _require(
            self.tokenizer is None or isinstance(self.tokenizer, str),
            f"tokenizer must be a path/name string or None, got {type(self.tokenizer).__name__}",
        )
        _require(
            self.dataset is not None, "dataset must not be None; pass a local file, a spec string or a list of texts"
        )
        if isinstance(self.dataset, str) and self._check_dataset:
            _check_dataset_spec(self.dataset)
        _require(
            isinstance(self.layer_config, dict), f"layer_config must be a dict, got {type(self.layer_config).__name__}"
        )
        for name, value in self.layer_config.items():
            _require(
                isinstance(name, str) and name.strip(),
                f"layer_config keys must be layer names, fragments or patterns, got {name!r}",
            )
            override = layer_override(value)
            if not keeps_16_bit(override):
                LayerSpec(**{**self.default_spec_fields(), **override})  # raises with the accepted values
        self._validate_formats()
        self._validate_backend()

    def _validate_formats(self) -> None:
        from .packing.registry import format_packer

        _require(
            isinstance(self.format, str) and self.format.strip(),
            f"format must be a non-empty string, got {self.format!r}",
        )
        default = self.default_spec()
        specs = {}
        for layer, value in self.layer_config.items():
            override = layer_override(value)
            if not keeps_16_bit(override):
                specs[layer] = LayerSpec(**{**self.default_spec_fields(), **override})
        if self.gguf_mixture() is not None:
            self._validate_gguf(default, specs)
            return
        for layer, spec in {"the scheme": default, **specs}.items():
            _require(
                spec is None or gguf_type_of(spec.data_type) is None,
                f"{layer} uses the GGUF type {spec and spec.data_type!r}, which only format='gguf:<type>' writes "
                f"(got format={self.format!r})",
            )
        for name in self.formats():
            packer = format_packer(name, default)  # raises on an unknown format, listing the accepted ones
            # A scheme the format cannot hold fails here, before any model is loaded or tuned.
            if default is not None and (reason := packer.can_hold_spec(default)):
                raise ValueError(f"format {name!r} cannot hold the scheme {default}: {reason}")
            for layer, spec in specs.items():
                if reason := packer.can_hold_spec(spec):
                    raise ValueError(f"format {name!r} cannot hold layer_config[{layer!r}] = {spec}: {reason}")
                if spec != default and not packer.per_layer_specs:
                    raise ValueError(
                        f"format {name!r} stores one spec per model; layer_config[{layer!r}] = {spec} differs from "
                        f"{default} (only {{'bits': 16}}, i.e. unquantized, is accepted per layer)"
                    )

    def _validate_gguf(self, default: LayerSpec | None, specs: dict[str, LayerSpec]) -> None:
        """A GGUF file is written alone, from a GGUF scheme, with GGUF types only (llama.cpp reads nothing else)."""
        _require(
            len(self.formats()) == 1,
            f"format={self.format!r}: a GGUF file is written on its own; save other formats in a separate call",
        )
        _require(
            default is not None and gguf_type_of(default.data_type) is not None,
            f"format={self.format!r} writes llama.cpp's types; use scheme={GGUF_SCHEME_PREFIX + self.gguf_mixture().upper()!r}"
            f" (or leave scheme unset), got scheme={self.scheme!r}",
        )
        for layer, spec in specs.items():
            _require(
                gguf_type_of(spec.data_type) is not None,
                f"format={self.format!r} cannot hold layer_config[{layer!r}] = {spec}: a GGUF file stores GGUF types "
                "only (data_type='gguf:q8_0', ...) or 16 bit",
            )

    def gguf_mixture(self) -> str | None:
        """The llama.cpp file type when the format is ``"gguf:<type>"`` (e.g. ``"q4_k_m"``), else ``None``."""
        formats = self.formats()
        return gguf_mixture_of(formats[0]) if formats else None

    def _validate_backend(self) -> None:
        from .kernels.registry import backend_names

        names = backend_names()
        _require(
            self.backend == "auto" or self.backend in names,
            f"backend={self.backend!r} is unknown; accepted: {['auto', *names]}",
        )

    # -- derived views ----------------------------------------------------------------------------
    def formats(self) -> list[str]:
        """``"auto_round,auto_gptq"`` -> ``["auto_round", "auto_gptq"]``."""
        return [f.strip().lower() for f in self.format.split(",") if f.strip()]

    def default_spec_fields(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "data_type": self.data_type,
            "act_bits": self.act_bits,
            "act_data_type": self.act_data_type,
            "act_group_size": self.act_group_size,
            "act_dynamic": self.act_dynamic,
        }

    def default_spec(self) -> LayerSpec | None:
        """The LayerSpec of layers without an override (``None`` for a 16-bit scheme such as BF16)."""
        return None if self.bits >= 16 else LayerSpec(**self.default_spec_fields())

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-only description, in the reference's keys (what ``save_pretrained`` writes)."""
        if self.packed is not None:
            return copy.deepcopy(self.packed)
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "data_type": self.data_type,
            "act_bits": self.act_bits,
        }
        if self.act_bits < 16:
            out.update(
                act_data_type=self.act_data_type, act_group_size=self.act_group_size, act_dynamic=self.act_dynamic
            )
        if self.packing_format is not None:
            out["packing_format"] = self.packing_format
        if self.extra_config:
            out["extra_config"] = copy.deepcopy(self.extra_config)
        if self.block_name_to_quantize is not None:
            out["block_name_to_quantize"] = self.block_name_to_quantize
        for key in _TUNING_KEYS:
            out[key] = getattr(self, key)
        out["dataset"] = (
            self.dataset
            if isinstance(self.dataset, str)
            else f"<{type(self.dataset).__name__} of {len(self.dataset)} samples>"
        )
        out["quant_lm_head"] = self.quant_lm_head
        # Only when set, so configs of plain runs keep the keys they always had.
        if self.ignore_layers:
            out["ignore_layers"] = ",".join(self.ignore_layers)
        if self.to_quant_block_names is not None:
            out["to_quant_block_names"] = list(self.to_quant_block_names)
        if self.quant_nontext_module:
            out["quant_nontext_module"] = True
        if self.moe_expert_names != "original":
            out["moe_expert_names"] = self.moe_expert_names
        if self.enable_deterministic_algorithms:
            out["enable_deterministic_algorithms"] = True
        out["backend"] = self.backend
        out.update(copy.deepcopy(self.unknown_keys))
        return out

    def tuning_device(self) -> str | tuple[str, ...] | dict[str, str] | None:
        """The devices blocks are tuned on, from ``device_map`` (the reference's name; ``device`` too).

        One device, a string: None (accelerator 0 for a model on the host, as the reference's default ``0``; else
        where the model is), ``"auto"`` (the accelerator when there is one), ``"cpu"``, ``0`` / ``"0"``
        (accelerator 0), ``"cuda:1"``, ``"xpu"``, ``"hpu"`` ...  A device is a string, never a code path.  Several
        devices, a tuple: ``"0,1"``, ``"cuda:0,cuda:1"``, ``"0,cpu"``, a list, or ``"auto"`` on a machine with
        several accelerators (all of them); each block is tuned whole on the first that holds it, else split layer
        by layer over them.  A dict ``{layer name or pattern: device}`` (the
        reference's DeepSeek-V3 example): the named layers of every block are tuned there, the rest of the block
        on the dict's first accelerator.  See :mod:`signround.placement`."""
        value = self.device_map
        if value is None:
            return None
        if isinstance(value, Mapping):
            _require(bool(value), f"device_map={value!r} is empty; {_ACCEPTED_DEVICE_MAPS}")
            for key in value:
                _require(
                    isinstance(key, str) and bool(key.strip(".")) and _is_pattern(key),
                    f"device_map key {key!r} is not a layer name or pattern; {_ACCEPTED_DEVICE_MAPS}",
                )
            return {key: self._one_device(device, several=True) for key, device in value.items()}
        if isinstance(value, (list, tuple)):
            return self._several(list(value))
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        _require(isinstance(value, str), f"device_map={value!r} is not supported for tuning; {_ACCEPTED_DEVICE_MAPS}")
        value = value.strip()
        if value == "auto":
            accelerator = getattr(torch, "accelerator", None)
            current = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
            if current is not None and accelerator.device_count() > 1:
                return tuple(f"{current.type}:{i}" for i in range(accelerator.device_count()))
            return str(current) if current is not None else "cpu"
        if "," in value:
            return self._several(value.split(","))
        return self._one_device(value)

    def _several(self, items: list[Any]) -> str | tuple[str, ...]:
        devices = tuple(dict.fromkeys(self._one_device(item, several=True) for item in items if str(item).strip()))
        _require(bool(devices), f"device_map={self.device_map!r} names no device; {_ACCEPTED_DEVICE_MAPS}")
        return devices if len(devices) > 1 else devices[0]

    def _one_device(self, value: Any, several: bool = False) -> str:
        """One device of ``device_map``, checked against this machine; in a list or dict a bare accelerator type
        means its device 0 (``"cuda"`` -> ``"cuda:0"``)."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        _require(
            isinstance(value, str),
            f"device_map={self.device_map!r}: {value!r} is not a device; {_ACCEPTED_DEVICE_MAPS}",
        )
        value = value.strip()
        if value.isdigit():
            accelerator = getattr(torch, "accelerator", None)
            current = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
            _require(current is not None, f"device_map={self.device_map!r} names an accelerator; this machine has none")
            value = f"{current.type}:{value}"  # checked below like any device string
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device_map={self.device_map!r}: {value!r} is not a device; {_ACCEPTED_DEVICE_MAPS}"
            ) from err
        if device.type != "cpu":
            accelerator = getattr(torch, "accelerator", None)
            current = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
            _require(
                current is not None and current.type == device.type,
                f"device_map={value!r}: no {device.type} device here"
                + (f" (this machine has {current.type})" if current is not None else " (only the CPU)"),
            )
            count = accelerator.device_count()
            _require(
                device.index is None or device.index < count,
                f"device_map={value!r}: only {count} {device.type} devices",
            )
            if several and device.index is None:
                return f"{device.type}:0"
        return value

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def get_loading_attributes(self) -> dict[str, Any]:
        """What a user's config may change when loading a packed checkpoint."""
        return {"backend": self.backend}
