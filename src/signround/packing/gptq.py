"""GPTQ checkpoints (``quant_method: "gptq"``), as AutoGPTQ / GPTQModel and transformers' GPTQ path read them.

Per layer four tensors, the GPTQ layout shared with ``auto_round:auto_gptq`` plus ``g_idx``:

* ``qweight`` int32 ``[in * bits / 32, out]``, ``qzeros`` int32 ``[G, out * bits / 32]``, ``scales`` float16
  ``[G, out]`` (see :mod:`signround.packing.auto_round` and :mod:`signround.packing.bits`; 3-bit values straddle
  words);
* ``g_idx`` int32 ``[in]``: the group of each input row, ``i // group_size`` (no act-order).

Two registered variants, named as the config's ``checkpoint_format`` says:

* ``"gptq"`` (v1): zero points stored minus one.  Written for symmetric models (zero ``2^(b-1)`` is stored as
  ``2^(b-1) - 1``).  An asymmetric zero point of 0 has no v1 encoding, so asymmetric models are written as v2.
* ``"gptq_v2"``: zero points as-is (GPTQModel's internal format; transformers passes ``checkpoint_format`` on).

Checkpoints quantized with act-order (``desc_act: true`` and a permuting ``g_idx``) are refused with that reason.
Per-layer differences use GPTQModel's ``dynamic`` map (``"-:regex"`` skips a module, ``"+:regex"`` overrides
bits / group_size / sym); a quantized ``lm_head`` is flagged with ``lm_head: true``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..quant.int import QuantizedTensor, effective_group_size
from ..schemes import LayerSpec
from .auto_round import _AutoRoundLayout
from .registry import Packer, TensorLayout, get_packer, register_packer

__all__ = ["QUANT_METHOD", "GptqPacker", "GptqV2Packer"]

QUANT_METHOD = "gptq"
_HEAD_NAMES = ("lm_head",)


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` without act-order: input row ``i`` belongs to group ``i // group_size``."""
    gs = effective_group_size(group_size, in_features)
    return torch.arange(in_features, dtype=torch.int32) // gs


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


class _GptqLayout(_AutoRoundLayout):
    tensor_names: ClassVar[tuple[str, ...]] = ("qweight", "qzeros", "scales", "g_idx")
    checkpoint_format: ClassVar[str] = ""

    def tensor_shapes_dtypes(self, spec: LayerSpec, in_features: int, out_features: int) -> TensorLayout:
        layout = super().tensor_shapes_dtypes(spec, in_features, out_features)
        layout["g_idx"] = ((in_features,), torch.int32)
        return layout

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        tensors = super().pack(qt)
        tensors["g_idx"] = trivial_g_idx(qt.codes.shape[1], qt.spec.group_size).to(qt.codes.device)
        return tensors

    def check_values(
        self, tensors: Mapping[str, torch.Tensor], spec: LayerSpec, in_features: int, out_features: int
    ) -> None:
        g_idx = tensors["g_idx"]
        if g_idx.device.type != "meta" and not torch.equal(
            g_idx.cpu().to(torch.int32), trivial_g_idx(in_features, spec.group_size)
        ):
            raise ValueError(
                f"packing {self.name!r}: g_idx is not i // group_size ({spec.group_size}): the checkpoint was "
                "quantized with act-order (desc_act), which signround does not load"
            )

    # -- config -------------------------------------------------------------------------------------------------
    def quantization_config(
        self, default: LayerSpec, overrides: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """GPTQConfig's keys; ``extra`` may carry ``signround_version``; layers outside the blocks other than
        ``lm_head`` cannot be described and are refused."""
        dynamic: dict[str, dict[str, Any]] = {}
        lm_head = False
        blocks = extra.get("block_name_to_quantize")
        for name, fields in overrides.items():
            quantized = fields.get("bits", default.bits) < 16
            if name.split(".")[-1] in _HEAD_NAMES:
                lm_head = quantized
                if quantized and any(fields.get(k, getattr(default, k)) != getattr(default, k) for k in fields):
                    raise ValueError(f"gptq stores lm_head with the model-wide spec; {name!r} has {dict(fields)}")
                continue
            if blocks and not name.startswith(f"{blocks}."):
                raise ValueError(f"gptq quantizes only the decoder blocks and lm_head; cannot describe {name!r}")
            if not quantized:
                dynamic[f"-:{_exact(name)}"] = {}
            elif fields:
                dynamic[f"+:{_exact(name)}"] = {k: v for k, v in fields.items() if k in ("bits", "group_size", "sym")}
        cfg: dict[str, Any] = {
            "bits": default.bits,
            "group_size": default.group_size,
            "desc_act": False,
            "sym": default.sym,
            "true_sequential": True,
            "lm_head": lm_head,
            "quant_method": QUANT_METHOD,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "meta": {"quantizer": [f"signround:{extra.get('signround_version', 'unknown')}"]},
        }
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg

    def parse_config(self, cfg: Mapping[str, Any]) -> tuple[LayerSpec, dict[str, dict[str, Any]]]:
        if cfg.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"not a GPTQ config: quant_method={cfg.get('quant_method')!r}; expected 'gptq'")
        fmt = cfg.get("checkpoint_format") or cfg.get("format") or "gptq"
        if get_packer(fmt) is not self:
            raise ValueError(f"config has checkpoint_format={fmt!r}; read it with get_packer({fmt!r})")
        if cfg.get("desc_act"):
            raise ValueError(
                "GPTQ checkpoint with desc_act=true (act-order): its rows are permuted by g_idx, which signround "
                "does not load; accepted: desc_act=false"
            )
        try:
            default = LayerSpec(
                bits=int(cfg["bits"]), group_size=int(cfg["group_size"]), sym=bool(cfg.get("sym", True))
            )
        except KeyError as err:
            raise ValueError(f"GPTQ config lacks {err.args[0]!r}") from err
        overrides: dict[str, dict[str, Any]] = {}
        for key, fields in (cfg.get("dynamic") or {}).items():
            sign, _, pattern = key.partition(":") if key[:2] in ("+:", "-:") else ("+", ":", key)
            pattern = f"^(?:{pattern})"  # GPTQModel matches with re.match (anchored at the start only)
            if sign == "-":
                overrides[pattern] = {"bits": 16}
            else:
                overrides[pattern] = {k: fields[k] for k in ("bits", "group_size", "sym") if k in fields}
        if cfg.get("lm_head"):
            overrides["lm_head"] = {}
        return default, overrides


@register_packer("gptq")
class GptqPacker(_GptqLayout):
    """GPTQ v1: zero points stored minus one (symmetric models)."""

    zero_offset: ClassVar[int] = 1
    checkpoint_format: ClassVar[str] = "gptq"

    def can_hold_spec(self, spec: LayerSpec) -> str | None:
        if not spec.sym:
            return "sym=False: GPTQ v1 stores zero points minus one and cannot encode a zero point of 0; use gptq_v2"
        return self._spec_layout_reason(spec)

    def resolve(self, default: LayerSpec) -> Packer:
        """Asymmetric models are written as gptq_v2 (lossless zero points)."""
        return self if default.sym else get_packer(GptqV2Packer.name)


@register_packer("gptq_v2")
class GptqV2Packer(_GptqLayout):
    """GPTQ v2: zero points stored as-is."""

    zero_offset: ClassVar[int] = 0
    checkpoint_format: ClassVar[str] = "gptq_v2"
