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

import json
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
from .schemes import resolve_plan
from .tuning.engine import head_name, quantizable_layers

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


def _checkpoint_tensor_names(path: str) -> set[str] | None:
    """Tensor names in a local safetensors checkpoint (headers only); None when it cannot be listed."""
    root = Path(path)
    if not root.is_dir():
        return None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = sorted(root.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


class SignRoundHfQuantizer(HfQuantizer):
    """Quantize-on-load for unquantized checkpoints; QuantLinear rebuild for packed ones."""

    requires_calibration = False

    def __init__(self, quantization_config: AutoRoundConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.device_map: Any = None
        self.installed: dict[str, QuantLinear] = {}

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.device_map = kwargs.get("device_map")

    # -- loading a packed checkpoint ------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model  # quantize-on-load: keep plain Linear layers until the weights are in
        config: AutoRoundConfig = self.quantization_config
        checkpoint = read_checkpoint_config(config.to_dict())
        packer, default, overrides = checkpoint.packer, checkpoint.default, checkpoint.overrides
        wanted = {name for name, entry in overrides.items() if entry.get("bits", default.bits) < 16}
        head = head_name(model)
        candidates = [c for c in quantizable_layers(model, include_lm_head=True) if c[0] != head or c[0] in wanted]
        plan = resolve_plan(candidates, default, overrides, packer.can_load)
        dtype = next(iter(model.parameters())).dtype
        self.installed = install_empty(
            model, plan.layers, packer.name, _target_device(self.device_map), dtype, config.backend
        )
        if head is not None and head in self.installed:
            _untie_quantized_head(model, head)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            self._check_and_init(model)
        else:
            self._quantize(model)
        return model

    def _check_and_init(self, model: nn.Module) -> None:
        stored = _checkpoint_tensor_names(getattr(model, "name_or_path", "") or "")
        for name, layer in quant_linears(model).items():
            if stored is not None:
                missing = [t for t in layer.expected_buffers() if f"{name}.{t}" not in stored]
                if missing:
                    raise ValueError(
                        f"layer {name!r}: tensors {missing} are missing from the checkpoint {model.name_or_path!r}"
                    )
            layer.check_loaded(name)
            layer.post_init()

    # -- quantize on load -----------------------------------------------------------------------------------------
    def _quantize(self, model: nn.Module) -> None:
        from transformers import AutoTokenizer

        from .api import pack_model, quantize_model

        config: AutoRoundConfig = self.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model.name_or_path)
        result = quantize_model(model, tokenizer, config)
        pack_model(model, result, config)
        self.pre_quantized = True  # the model now holds packed layers, as if loaded from a checkpoint

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
