"""The Transformers plugin: quantize inside ``from_pretrained``, and load packed checkpoints into QuantLinear layers.

How it is wired (facts of transformers 5, see DESIGN.md "The Transformers plugin"):

* ``"auto-round"`` is a quant_method transformers already owns (its loader needs Intel's auto-round package).
  ``register_with_transformers`` replaces transformers' own two entries for that name with ours — once, only
  over transformers' built-in classes, and says so in a log line — so that our checkpoints carry the reference's
  ``quant_method`` (readable by Intel's loaders, vLLM, SGLang) and, after ``import signround``, load through us.
  Without ``import signround`` transformers' own loader is used, which fails loudly without auto-round.
* A checkpoint's quantization_config always wins over the user's in ``merge_quantization_configs``; a small,
  idempotent wrapper makes a user-passed :class:`AutoRoundConfig` build our config from the checkpoint — any
  quant_method :mod:`signround.convert` reads (auto-round, gptq, awq, compressed-tensors) — and carry over the
  loading attributes (``backend``).  Every other call goes to the original.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import QUANT_METHOD, AutoRoundConfig
from .convert import CHECKPOINT_METHODS, read_checkpoint_config
from .kernels.base import QuantLinear
from .layers import install_empty, quant_linears
from .models import head_name, linear_experts, unfuse_experts
from .models.conv1d import features, is_linear_like
from .schemes import resolve_plan

logger = logging.getLogger(__name__)


def _untie_quantized_head(model: nn.Module, head: str) -> None:
    """A quantized lm_head has its own tensors: stop transformers tying it to the embedding table (it would look
    for ``lm_head.weight``, which a QuantLinear does not have).  Checkpoints whose config still says tied (written
    by tools that quantize a tied head without untying the config) load too."""
    model.config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        model.all_tied_weights_keys = {k: v for k, v in tied.items() if not k.startswith(f"{head}.")}


def _target_device(device_map: Any) -> str:
    """Where the layers will run, from from_pretrained's ``device_map`` (decides the kernel backend)."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        values = [str(v) for v in device_map.values()]
        for v in values:
            if v not in ("cpu", "disk"):
                return v if not v.isdigit() else f"cuda:{v}"
        return "cpu"
    value = str(device_map)
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{value}" if value.isdigit() else value


def _stored_tensor_names(checkpoint_files: list[str] | None) -> set[str]:
    """Tensor names of the checkpoint's safetensors files (headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in checkpoint_files or []:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"signround loads safetensors checkpoints only; got {Path(f).name!r}")
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _renamed(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the name it takes in ``model``, through transformers' own renamings (legacy VLM
    prefixes ``language_model.model.`` -> ``model.language_model.``, Mixtral's ``block_sparse_moe`` -> ``mlp``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    return {name: rename_source_key(name, renamings, [])[0] for name in names}


def _untaken(model: nn.Module, stored: set[str], hf_quantizer: HfQuantizer) -> list[str]:
    """Checkpoint tensors (renamed) that are neither in the model's state dict, nor merged by one of the model's
    conversion rules, nor ignored on purpose by the model class (``_keys_to_ignore_on_load_unexpected``)."""
    import re

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, apply_converters

    converters = [
        t for t in get_model_conversion_mapping(model, hf_quantizer=hf_quantizer) if isinstance(t, WeightConverter)
    ]
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    present = set(model.state_dict())
    return sorted(
        name
        for name in stored
        if name not in present
        and not any(p.search(name) for p in ignored)
        and apply_converters(name, converters)[1] is None
    )


def _quantized_layer_names(stored: set[str], packer_tensors: tuple[str, ...]) -> set[str]:
    """Layers holding one of the packing's marker tensors (``qweight``, ``weight_packed``, ``weight_scale``) in the
    checkpoint (``packer_tensors``: the packer's ``marker_tensors``, else its first tensor)."""
    suffixes = ["." + name for name in packer_tensors]
    return {name[: -len(s)] for name in stored for s in suffixes if name.endswith(s)}


_FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def _overrides_for(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The checkpoint's per-layer spec overrides.  Its 16-bit entries are dropped: which layers are packed is read
    from the tensors themselves, and a 16-bit pattern (matched with ``re.search``, as the reference does) must not
    unpack a layer whose tensors are there."""
    return {k: v for k, v in overrides.items() if v.get("bits", 0) < 16}


def _mark_parents_initialized(model: nn.Module, installed: dict[str, Any], stored: set[str]) -> None:
    """Some families' weight init reaches into a parent for its child's weight (GPT-2 rescales ``c_proj.weight``),
    which a QuantLinear does not have.  A parent whose own tensors all come from the checkpoint needs no init."""
    for name in installed:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        own = [f"{parent_name}.{n}" for n, _ in parent.named_parameters(recurse=False)]
        if all(key in stored for key in own):
            parent._is_hf_initialized = True


# Share of each accelerator kept free for tuning when transformers places a model to quantize on load.
TUNING_HEADROOM = 0.2


def _is_accelerator_key(key: Any) -> bool:
    """A ``max_memory`` key naming an accelerator (``0``, ``"cuda:1"``), not the host or disk."""
    return str(key) not in ("cpu", "disk", "mps") if not isinstance(key, bool) else False


class SignRoundHfQuantizer(HfQuantizer):
    """Quantize-on-load for unquantized checkpoints; QuantLinear rebuild for packed ones."""

    requires_calibration = False

    def __new__(cls, quantization_config: Any, **kwargs: Any) -> Any:
        """A checkpoint config signround handed to Intel's loader (:mod:`signround.handoff`) gets transformers' own
        quantizer for it (Python then skips our ``__init__``)."""
        if not isinstance(quantization_config, AutoRoundConfig):
            from .handoff import foreign_quantizer

            return foreign_quantizer(quantization_config, **kwargs)
        return super().__new__(cls)

    def __init__(self, quantization_config: AutoRoundConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.device_map: Any = None
        self.installed: dict[str, QuantLinear] = {}
        self.stored_names: set[str] | None = None  # checkpoint tensor names as the model names them
        self.unfused_experts: dict[str, Any] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        """Runs before any weight is read: refuse here what quantize-on-load cannot deliver."""
        mixture = self.quantization_config.gguf_mixture()
        if not self.pre_quantized and mixture is not None:  # a llama.cpp file is not a Transformers checkpoint
            raise ValueError(
                f"format 'gguf:{mixture}' writes a llama.cpp .gguf file, which save_pretrained cannot: quantize with "
                f"signround.AutoRound(model, tokenizer, format='gguf:{mixture}').quantize_and_save(out_dir) or "
                f"`signround --model ... --format gguf:{mixture}`; quantize-on-load accepts the formats auto_round, "
                "auto_gptq, auto_awq, llm_compressor"
            )
        self.device_map = kwargs.get("device_map")

    def adjust_max_memory(self, max_memory: dict[Any, int | str]) -> dict[Any, int | str]:
        """Quantize-on-load with an accelerate ``device_map`` ("auto", "balanced", ...): each accelerator keeps a
        share free for the block being tuned on it (its rounding offsets, codes and activations: a few times one
        block's weights, a few percent of a model's).  A fixed share, like the
        bitsandbytes quantizer's, because transformers passes no model here.  Host and disk budgets are kept."""
        if self.pre_quantized:
            return max_memory
        return {
            key: int(value * (1 - TUNING_HEADROOM))
            if _is_accelerator_key(key) and not isinstance(value, str)
            else value
            for key, value in max_memory.items()
        }

    # -- loading a packed checkpoint ------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Swap in empty QuantLinear layers for exactly the layers whose packed tensors the checkpoint holds.

        The checkpoint's tensor names (renamed as transformers will rename them) decide which layers are quantized;
        its quantization_config gives their specs.  Fused MoE experts whose per-expert tensors are packed become
        per-expert Linear layers first.  A packed layer the model does not have is an error, never dropped.
        """
        if not self.pre_quantized:
            return model  # quantize-on-load: keep plain Linear layers until the weights are in
        config: AutoRoundConfig = self.quantization_config
        checkpoint = read_checkpoint_config(config.to_dict())
        packer, default, overrides = checkpoint.packer, checkpoint.default, checkpoint.overrides
        stored = _stored_tensor_names(kwargs.get("checkpoint_files"))
        self.stored_names = set(_renamed(model, stored).values())
        packed = _quantized_layer_names(self.stored_names, packer.marker_tensors or packer.tensor_names[:1])
        if any(".experts." in name for name in packed):
            self.unfused_experts = unfuse_experts(model, empty=True, checkpoint_names=self.stored_names)
        modules = dict(model.named_modules())
        unknown = sorted(name for name in packed if not is_linear_like(modules.get(name, nn.Identity())))
        if unknown:
            raise ValueError(
                f"checkpoint holds packed tensors for {len(unknown)} layers that {type(model).__name__} has no "
                f"Linear for: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            )
        candidates = [(name, *features(module)) for name, module in modules.items() if name in packed]
        plan = resolve_plan(candidates, default, _overrides_for(overrides), packer.can_load)
        refused = plan.skipped
        if refused:
            raise ValueError(
                f"layer {refused[0].name!r} is packed in the checkpoint but cannot be loaded: {refused[0].reason}"
            )
        dtype = next(iter(model.parameters())).dtype
        head = head_name(model)  # before the swap: a QuantLinear head is no nn.Linear
        self.installed = install_empty(
            model, plan.layers, packer.name, _target_device(self.device_map), dtype, config.backend
        )
        _mark_parents_initialized(model, self.installed, self.stored_names)
        if head is not None and head in self.installed:
            _untie_quantized_head(model, head)
        return model

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """Once experts are per-expert layers, transformers' rules merging ``experts.*.w1.weight`` into the fused
        ``experts.gate_up_proj`` no longer apply: per-expert tensors load into their own layers."""
        conversions = super().update_weight_conversions(weight_conversions, model)
        if not self.unfused_experts:
            return conversions
        from transformers.core_model_loading import WeightConverter

        fused = {f"{name.rpartition('.')[2]}.{p}" for name in self.unfused_experts for p in _FUSED_EXPERT_PARAMS}
        return [
            c
            for c in conversions
            if not (
                isinstance(c, WeightConverter)
                and any(t.rstrip("$").endswith(tuple(fused)) for t in c._original_target_patterns)
            )
        ]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            self._check_and_init(model)
        else:
            self._quantize(model)
        return model

    def _check_and_init(self, model: nn.Module) -> None:
        """Every packed layer found all its tensors, and every per-expert layer its weight: else an error naming
        them (transformers only warns and leaves uninitialised memory)."""
        stored = self.stored_names
        for name, layer in quant_linears(model).items():
            if stored is not None:
                missing = [t for t in layer.expected_buffers() if f"{name}.{t}" not in stored]
                if missing:
                    raise ValueError(
                        f"layer {name!r}: tensors {missing} are missing from the checkpoint {model.name_or_path!r}"
                    )
            layer.check_loaded(name)
            layer.post_init()
        if stored is not None:
            unexpected = _untaken(model, stored, self)
            if unexpected:
                raise ValueError(
                    f"checkpoint {model.name_or_path!r} holds {len(unexpected)} tensors no module of "
                    f"{type(model).__name__} takes: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
                )
            for experts_name, experts in linear_experts(model).items():
                for sub, module in experts.named_modules():
                    if isinstance(module, nn.Linear) and f"{experts_name}.{sub}.weight" not in stored:
                        raise ValueError(
                            f"layer '{experts_name}.{sub}': its weight is missing from the checkpoint "
                            f"{model.name_or_path!r} (experts are stored per expert)"
                        )

    # -- quantize on load -----------------------------------------------------------------------------------------
    def _quantize(self, model: nn.Module) -> None:
        from transformers import AutoTokenizer

        from .api import pack_model, quantize_model

        config: AutoRoundConfig = self.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model.name_or_path)
        result = quantize_model(model, tokenizer, config)
        pack_model(model, result, config)
        self.pre_quantized = True  # the model now holds packed layers, as if loaded from a checkpoint

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """``save_pretrained``'s state dict: without the blocks already written by a streaming save
        (:mod:`signround.streaming`), whose tensors are released; None (the model's own) otherwise."""
        shards = getattr(model, "_signround_block_shards", None)
        if shards is None or not shards.streamed:
            return None, {}
        prefixes = shards.prefixes
        return {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}, {}

    # -- transformers flags ---------------------------------------------------------------------------------------
    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_REGISTERED = False


def register_with_transformers() -> None:
    """Route quant_method "auto-round" to signround (idempotent).  Called by ``import signround``."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers import auto

    replaced = []
    for mapping, ours in (
        (auto.AUTO_QUANTIZER_MAPPING, SignRoundHfQuantizer),
        (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, AutoRoundConfig),
    ):
        current = mapping.get(QUANT_METHOD)
        if current is ours:
            continue
        if current is not None and not current.__module__.startswith("transformers."):
            raise RuntimeError(
                f"quant_method {QUANT_METHOD!r} is already routed to {current.__module__}.{current.__name__}; "
                "signround only replaces transformers' own built-in entries"
            )
        mapping[QUANT_METHOD] = ours
        replaced.append(f"{current.__module__}.{current.__name__}" if current else "(none)")
    _wrap_merge(auto.AutoHfQuantizer)
    if replaced:
        logger.info(
            "signround: quant_method %r now loads through signround (replaced %s)", QUANT_METHOD, ", ".join(replaced)
        )
    _REGISTERED = True


def _wrap_merge(auto_hf_quantizer: type) -> None:
    original = auto_hf_quantizer.merge_quantization_configs
    if getattr(original, "_signround", False):
        return

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if not isinstance(quantization_config_from_args, AutoRoundConfig):
            return original(quantization_config, quantization_config_from_args)
        description = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
        method = description.get("quant_method")
        if method not in CHECKPOINT_METHODS:
            raise ValueError(
                f"signround cannot load checkpoints with quant_method={method!r}; accepted: {sorted(CHECKPOINT_METHODS)}"
            )
        merged = AutoRoundConfig.from_checkpoint(description)
        for key, value in quantization_config_from_args.get_loading_attributes().items():
            setattr(merged, key, value)
        return merged

    merge_quantization_configs._signround = True  # type: ignore[attr-defined]
    auto_hf_quantizer.merge_quantization_configs = classmethod(merge_quantization_configs)
