"""Mixture-of-experts layers as per-expert ``nn.Linear`` modules.

Transformers 5 stores the experts of most MoE families as fused 3-D parameters (``gate_up_proj``
``[experts, 2*ffn, hidden]``, ``down_proj`` ``[experts, hidden, ffn]``) in a class decorated with
``use_experts_implementation``, which records the layout on the instance (``is_transposed``,
``is_concatenated``, ``has_bias``, ``has_gate``).  SignRound tunes Linear layers, and every serving engine
(vLLM, SGLang, Intel's loader) expects quantized experts as per-expert tensors under the family's original
names (``experts.{i}.w1.qweight``).  So fused experts are swapped for :class:`LinearExperts`: a ModuleList of
per-expert MLPs whose Linear layers carry those names, computing exactly what the fused module computed (the
family's own gate function included).  Every later stage then sees plain Linear layers.

The per-expert names come from transformers' own checkpoint conversion rules (the ``WeightConverter`` that
merges ``experts.*.w1.weight`` into ``experts.gate_up_proj`` at load), so the quantized checkpoint uses the
names the original checkpoint used; the model's renamings (Mixtral's ``block_sparse_moe`` -> ``mlp``) apply to
our tensors on save and load like to any other.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .families import DEFAULT_EXPERT_NAMES, DEFAULT_UNGATED_EXPERT_NAMES, EXPERT_NAMINGS, SEQUENTIAL_EXPERTS

_LAYOUT_FLAGS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")


@dataclass(frozen=True)
class ExpertsLayout:
    """How one fused experts module stores its weights, and the per-expert layer names it unfuses into."""

    num_experts: int
    hidden: int
    intermediate: int
    has_gate: bool
    has_bias: bool
    transposed: bool
    concatenated: bool
    names: tuple[str, ...]  # (gate, up, down), or (up, down) without a gate

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-expert layer name -> (in_features, out_features)."""
        h, f = self.hidden, self.intermediate
        shapes = {name: (h, f) for name in self.names[:-1]}
        shapes[self.names[-1]] = (f, h)
        return shapes


def is_fused_experts(module: nn.Module) -> bool:
    """A module decorated with transformers' ``use_experts_implementation`` (it records its layout flags)."""
    return all(isinstance(getattr(module, flag, None), bool) for flag in _LAYOUT_FLAGS) and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a fused experts module cannot be unfused (then it stays in 16 bit, reported), or None."""
    if type(module).__name__ in SEQUENTIAL_EXPERTS:
        return None
    if getattr(module, "has_post_expert_norm", False):
        return f"{type(module).__name__}: experts with a post-expert norm are not supported yet"
    if module.down_proj.dim() != 3:
        return f"{type(module).__name__}: down_proj is not a 3-D [experts, ...] tensor"
    return None


def _converter_leaf_names(model: nn.Module, attr: str, param: str) -> list[str] | None:
    """Per-expert leaf names that transformers' conversion rules merge into ``<attr>.<param>`` (e.g. ``["w1",
    "w3"]`` for Mixtral's ``experts.gate_up_proj``), in merge order; None when no rule names them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # pragma: no cover - transformers < 5
        return None
    try:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # a model transformers cannot map (custom code): fall back to the defaults
        return None
    leaf = re.compile(rf"(?:^|\.){re.escape(attr)}\.\*\.(\w+)\.weight\$?$")
    for conv in conversions:
        if not isinstance(conv, WeightConverter):
            continue
        targets = [t.rstrip("$") for t in conv._original_target_patterns]
        if len(targets) != 1 or not targets[0].endswith(f"{attr}.{param}"):
            continue
        names = [m.group(1) for s in conv._original_source_patterns if (m := leaf.search(s))]
        if names and len(names) == len(conv._original_source_patterns):
            return names
    return None


def layout_of(
    model: nn.Module,
    name: str,
    module: nn.Module,
    checkpoint_names: set[str] | None = None,
    naming: str = "original",
) -> ExpertsLayout:
    """The layout of the fused experts module ``name`` of ``model``, with its per-expert names.

    With ``naming="original"`` the names are those transformers' conversion rules give the original checkpoint
    (Mixtral ``w1 / w3 / w2``), else ``gate_proj / up_proj / down_proj``; ``"gate_up_down"`` always takes the
    latter (see ``EXPERT_NAMINGS``).  Loading passes the checkpoint's tensor names: a checkpoint that spells its
    experts either way (Intel's and GPTQModel's Mixtral outputs use ``gate_proj``) is read as it is.
    """
    if naming not in EXPERT_NAMINGS:
        raise ValueError(f"moe_expert_names={naming!r} is not supported; accepted: {list(EXPERT_NAMINGS)}")
    attr = name.rpartition(".")[2]
    has_gate = bool(module.has_gate)
    up_param = "gate_up_proj" if has_gate else "up_proj"
    up = getattr(module, up_param)
    down = module.down_proj
    num_experts = down.shape[0]
    if module.is_transposed:  # [E, in, out]
        hidden, intermediate = down.shape[2], down.shape[1]
    else:  # [E, out, in]
        hidden, intermediate = down.shape[1], down.shape[2]
    expected_up = (num_experts, hidden, up.shape[2]) if module.is_transposed else (num_experts, up.shape[1], hidden)
    if tuple(up.shape) != expected_up or up.shape[2 if module.is_transposed else 1] != intermediate * (
        2 if has_gate else 1
    ):
        raise ValueError(f"experts {name!r}: {up_param} {tuple(up.shape)} does not match down_proj {tuple(down.shape)}")
    up_names = _converter_leaf_names(model, attr, up_param)
    down_names = _converter_leaf_names(model, attr, "down_proj")
    defaults = DEFAULT_EXPERT_NAMES if has_gate else DEFAULT_UNGATED_EXPERT_NAMES
    if (
        naming == "gate_up_down"
        or up_names is None
        or down_names is None
        or len(up_names) != (2 if has_gate else 1)
        or len(down_names) != 1
    ):
        names = defaults
    else:
        names = (*up_names, *down_names)
    if checkpoint_names is not None:
        names = _names_in_checkpoint(name, (tuple(names), defaults), checkpoint_names)
    return ExpertsLayout(
        num_experts=num_experts,
        hidden=hidden,
        intermediate=intermediate,
        has_gate=has_gate,
        has_bias=bool(module.has_bias),
        transposed=bool(module.is_transposed),
        concatenated=bool(module.is_concatenated),
        names=tuple(names),
    )


def _names_in_checkpoint(name: str, choices: tuple[tuple[str, ...], ...], stored: set[str]) -> tuple[str, ...]:
    """The per-expert name set the checkpoint uses for experts module ``name`` (first choice when it has none)."""
    for names in choices:
        if any(key.startswith(f"{name}.0.{names[-1]}.") for key in stored):
            return names
    return choices[0]


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused experts module of ``model`` by name (decorated ones and those in ``SEQUENTIAL_EXPERTS``)."""
    return {
        name: m for name, m in model.named_modules() if is_fused_experts(m) or type(m).__name__ in SEQUENTIAL_EXPERTS
    }


def _sequential_experts(model: nn.Module, module: nn.Module, empty: bool) -> nn.Module:
    """Transformers' own per-expert ModuleList for an undecorated experts class (Llama-4), holding its weights."""
    import importlib

    module_path, class_name = SEQUENTIAL_EXPERTS[type(module).__name__]
    cls = getattr(importlib.import_module(module_path), class_name)
    with torch.device("meta"):
        new = cls(model.config.get_text_config())
    if empty:
        return new
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()  # [E, H, 2F], [E, F, H]
    f = down.shape[1]
    for e, expert in enumerate(new):
        for linear, weight in (
            (expert.gate_proj, gate_up[e][:, :f]),
            (expert.up_proj, gate_up[e][:, f:]),
            (expert.down_proj, down[e]),
        ):
            linear.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    return new


class ExpertMLP(nn.Module):
    """One expert: Linear layers named as on disk (``w1``/``w3``/``w2``, ``gate_proj``/``up_proj``/``down_proj``).

    The gate activation is the fused module's own ``_apply_gate`` (gpt-oss clamps and uses a sigmoid GLU), fed
    the gate and up outputs in the fused layout it expects (concatenated or interleaved).
    """

    def __init__(self, layout: ExpertsLayout, owner: LinearExperts):
        super().__init__()
        self.layout = layout
        object.__setattr__(self, "_owner", owner)  # not a submodule: the parent holds the experts
        for name, (in_f, out_f) in layout.linear_shapes.items():
            self.add_module(name, nn.Linear(in_f, out_f, bias=layout.has_bias, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if layout.has_gate:
            gate = getattr(self, layout.names[0])(x)
            up = getattr(self, layout.names[1])(x)
            if layout.concatenated:
                gate_up = torch.cat([gate, up], dim=-1)
            else:
                gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
            hidden = self._owner.apply_gate(gate_up)
        else:
            hidden = self._owner.activation(getattr(self, layout.names[0])(x))
        return getattr(self, layout.names[-1])(hidden)


class LinearExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module: same call ``(hidden, top_k_index, top_k_weights)``, one
    :class:`ExpertMLP` per expert, computed only on the tokens routed to it (tuning time grows with the tokens
    routed, not with experts x tokens).

    Within :meth:`observing`, experts that no token was routed to also run on every token, output discarded,
    so hooks on their layers see inputs (the statistics their quantization starts from); routed-token counts
    are accumulated in ``routed_tokens``.
    """

    def __init__(self, layout: ExpertsLayout, shell: nn.Module):
        super().__init__()
        self.layout = layout
        self.num_experts = layout.num_experts
        # The fused module, emptied of its weights: keeps its gate function and activation (and their constants).
        object.__setattr__(self, "_shell", shell)
        self.extend(ExpertMLP(layout, self) for _ in range(layout.num_experts))
        self._observing = False
        # Where an offloaded fused module's weights are read from at the block's turn (see from_fused)
        self.fused_source: Mapping[str, torch.Tensor] | None = None
        self.routed_tokens = torch.zeros(layout.num_experts, dtype=torch.long)

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._shell._apply_gate(gate_up)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return self._shell.act_fn(x)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts + 1)[: self.num_experts]
            if self._observing:
                self.routed_tokens += counts.cpu()
            hit = counts.nonzero().flatten().tolist()
        for e in hit:
            token_idx, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx])
            y = y * top_k_weights[token_idx, pos, None].to(y.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        if self._observing:
            with torch.no_grad():
                for e in set(range(self.num_experts)) - set(hit):
                    self[e](hidden_states)
        return out

    @classmethod
    def from_fused(cls, module: nn.Module, layout: ExpertsLayout) -> LinearExperts:
        """Per-expert Linear layers holding the fused weights (views where the layout allows, so no copy).

        A fused module offloaded by accelerate (``low_cpu_mem_usage``: its weights on the meta device, read by
        its hook from the checkpoint) gives meta-device layers that remember where to read from: ``fill_from``
        with ``fused_source`` when the block's turn comes (:func:`signround.offload.materialize`)."""
        new = cls(layout, module)
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None and any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            new.fused_source = weights_map  # the layers get meta views now, their values at the block's turn
        new.fill_from({name: p.detach() for name, p in module.named_parameters(recurse=False)})
        _empty(module)  # the shell keeps no weights; the views above keep what they need alive
        return new

    def fused_names(self) -> list[str]:
        """The fused module's tensor names :meth:`fill_from` reads."""
        up = "gate_up_proj" if self.layout.has_gate else "up_proj"
        return [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if self.layout.has_bias else [])

    @torch.no_grad()
    def fill_from(self, fused: Mapping[str, torch.Tensor]) -> None:
        """Set every expert's Linear weights (and biases) from the fused tensors by their names in the fused
        module (:meth:`fused_names`)."""
        layout = self.layout
        up, down, *biases = self.fused_names()
        up_w, down_w = fused[up], fused[down]
        up_b, down_b = (fused[biases[0]], fused[biases[1]]) if biases else (None, None)
        f = layout.intermediate
        for e, expert in enumerate(self):
            w = up_w[e].t() if layout.transposed else up_w[e]  # [out, in]
            b = None if up_b is None else up_b[e]
            if layout.has_gate:
                if layout.concatenated:
                    parts = [(w[:f], None if b is None else b[:f]), (w[f:], None if b is None else b[f:])]
                else:
                    parts = [(w[0::2], None if b is None else b[0::2]), (w[1::2], None if b is None else b[1::2])]
            else:
                parts = [(w, b)]
            dw = down_w[e].t() if layout.transposed else down_w[e]
            parts.append((dw, None if down_b is None else down_b[e]))
            for name, (weight, bias) in zip(layout.names, parts, strict=True):
                linear = getattr(expert, name)
                linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
                if bias is not None:
                    linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)

    @classmethod
    def empty(cls, module: nn.Module, layout: ExpertsLayout) -> LinearExperts:
        """Per-expert Linear layers on the meta device, for a checkpoint loader to fill."""
        new = cls(layout, module)
        _empty(module)
        return new


def _empty(module: nn.Module) -> None:
    """Drop a fused experts module's own weights: it stays only as the holder of its gate function."""
    for param in [n for n, _ in module.named_parameters(recurse=False)]:
        delattr(module, param)


def unfuse_experts(
    model: nn.Module, empty: bool = False, checkpoint_names: set[str] | None = None, naming: str = "original"
) -> dict[str, ExpertsLayout | None]:
    """Swap every supported fused experts module of ``model`` for :class:`LinearExperts`; returns their layouts.

    ``empty``: build meta-device layers (before a checkpoint is loaded) instead of taking the fused weights;
    ``checkpoint_names`` (its tensor names, as the model names them) then picks the per-expert names it uses;
    else ``naming`` does (``EXPERT_NAMINGS``).  Modules whose layout is unsupported are left fused and not returned (see :func:`unsupported_experts`); those
    swapped for transformers' own per-expert class (``SEQUENTIAL_EXPERTS``) map to None.
    """
    done = {}
    for name, module in find_fused_experts(model).items():
        if type(module).__name__ in SEQUENTIAL_EXPERTS:
            model.set_submodule(name, _sequential_experts(model, module, empty))
            done[name] = None
            continue
        if unsupported_reason(module):
            continue
        layout = layout_of(model, name, module, checkpoint_names, naming)
        new = LinearExperts.empty(module, layout) if empty else LinearExperts.from_fused(module, layout)
        model.set_submodule(name, new)
        done[name] = layout
    return done


def unsupported_experts(model: nn.Module) -> dict[str, str]:
    """Fused experts modules left fused, by name, with the reason (they stay in 16 bit and are reported)."""
    return {name: reason for name, m in find_fused_experts(model).items() if (reason := unsupported_reason(m))}


def linear_experts(model: nn.Module) -> dict[str, LinearExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearExperts)}


@contextmanager
def observing_experts(module: nn.Module) -> Iterator[dict[str, LinearExperts]]:
    """Within this context every :class:`LinearExperts` under ``module`` counts its routed tokens and feeds
    every token to the experts that got none (inputs for their statistics; outputs unchanged)."""
    found = {name: m for name, m in module.named_modules() if isinstance(m, LinearExperts)}
    for m in found.values():
        m._observing = True
    try:
        yield found
    finally:
        for m in found.values():
            m._observing = False
