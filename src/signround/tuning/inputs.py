"""Capturing and replaying a decoder block's inputs.

A block's forward needs more than the hidden states: attention mask, position ids, rotary embeddings,
cache flags — whatever the architecture passes.  Instead of knowing each architecture, the first block's
call is intercepted (a forward pre-hook with kwargs) once per calibration sample, and everything it
received is kept.  Keyword arguments equal for every sample (rotary tables, a causal mask, flags) are
stored once; those that differ (padding masks) are stacked per sample and re-batched on demand.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first block needs to run."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a is b or a == b


def _causal_like(template: torch.Tensor) -> torch.Tensor:
    """The explicit form of "no mask" (plain causal attention, what transformers means by a ``None`` mask) in the
    format of ``template``, a 4D ``[1, 1, T, S]`` mask of another sample: bool (True = attend) or additive float."""
    if template.dim() != 4 or template.shape[0] != 1:
        raise TypeError(f"cannot mix a None attention mask with a mask of shape {tuple(template.shape)}")
    rows, cols = template.shape[-2:]
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=template.device).tril(cols - rows)
    if template.dtype == torch.bool:
        causal = allowed
    else:
        causal = torch.zeros(rows, cols, dtype=template.dtype, device=template.device)
        causal.masked_fill_(~allowed, torch.finfo(template.dtype).min)
    return causal.expand(template.shape).contiguous()


def _fill_missing_masks(values: list[Any]) -> list[Any]:
    """Samples without padding get no mask (None) under sdpa, padded ones a 4D mask: give the unpadded samples the
    explicit causal mask, so the samples batch together."""
    template = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if template is None or all(isinstance(v, torch.Tensor) for v in values):
        return values
    causal = _causal_like(template)
    return [causal if v is None else v for v in values]


def _stack(values: list[Any]) -> Any:
    """Per-sample values (batch dim 1) -> one batched value, tuple structure kept."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values, dim=0)
    if isinstance(first, (tuple, list)):
        return type(first)(_stack([v[i] for v in values]) for i in range(len(first)))
    raise TypeError(f"cannot batch a per-sample block argument of type {type(first).__name__}")


def _index(value: Any, idx: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, (tuple, list)):
        return type(value)(_index(v, idx) for v in value)
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


# Arguments that must not carry state between the replays of a block.
_FORCED_KWARGS = {"use_cache": False, "past_key_value": None, "past_key_values": None, "cache": None}


@dataclass
class BlockInputs:
    """Hidden states ``[N, T, H]`` plus the block's other arguments, shared or per sample."""

    hidden: torch.Tensor
    shared: dict[str, Any] = field(default_factory=dict)
    per_sample: dict[str, Any] = field(default_factory=dict)
    # Where batches are computed, when the cache lives elsewhere (``low_gpu_mem_usage``: host cache, device block).
    compute_device: torch.device | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInputs:
        """Same arguments, other hidden states (a block's outputs feed the next block)."""
        return BlockInputs(hidden, self.shared, self.per_sample, self.compute_device)

    def with_shared(self, shared: dict[str, Any]) -> BlockInputs:
        """Same samples, other shared arguments (e.g. cast once to the tuning loop's dtype)."""
        return BlockInputs(self.hidden, shared, self.per_sample, self.compute_device)

    def to(self, device: torch.device) -> BlockInputs:
        return BlockInputs(
            hidden=self.hidden.to(device),
            shared={k: _to(v, device) for k, v in self.shared.items()},
            per_sample={k: _to(v, device) for k, v in self.per_sample.items()},
        )

    def placed(self, cache: torch.device, compute: torch.device) -> BlockInputs:
        """The cached tensors on ``cache``; every batch handed out moved to ``compute`` (one transfer per batch)."""
        moved = self.to(cache)
        return BlockInputs(moved.hidden, moved.shared, moved.per_sample, None if cache == compute else compute)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        kwargs = dict(self.shared)
        kwargs.update({k: _index(v, idx) for k, v in self.per_sample.items()})
        hidden = self.hidden[idx.to(self.hidden.device)]
        if self.compute_device is not None:
            hidden, kwargs = hidden.to(self.compute_device), {k: _to(v, self.compute_device) for k, v in kwargs.items()}
        return hidden, kwargs

    def batch_indices(self, batch_size: int) -> Iterator[torch.Tensor]:
        n = len(self)
        for start in range(0, n, batch_size):
            yield torch.arange(start, min(start + batch_size, n))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for idx in self.batch_indices(batch_size):
            yield self.batch(idx)


def _positional_as_keywords(block: nn.Module, args: tuple) -> dict[str, Any]:
    """Extra positional arguments of a block call (GPT-2 passes its cache and mask positionally) by parameter
    name, so every replay passes them as keywords."""
    if not args:
        return {}
    params = [
        p.name
        for p in inspect.signature(block.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < len(args) + 1:
        raise NotImplementedError(f"{type(block).__name__} is called with more positional arguments than it names")
    return dict(zip(params[1 : len(args) + 1], args, strict=True))


def _input_device(model: nn.Module) -> torch.device:
    """Where the model takes its input ids: the embedding's execution device when accelerate's hook places it (its
    weights may sit on the meta device, offloaded), else the first real parameter's device."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> BlockInputs:
    """Run the model on each sample until its first block and keep what that block receives."""
    records: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        records.append((hidden.detach(), {**_positional_as_keywords(module, args[1:]), **kwargs}))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = _input_device(model)
    try:
        for i in range(input_ids.shape[0]):
            ids = input_ids[i : i + 1].to(device)
            mask = None if attention_mask is None else attention_mask[i : i + 1].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    if len(records) != input_ids.shape[0]:
        raise RuntimeError("the first decoder block was not called for every calibration sample")

    hidden = torch.cat([h for h, _ in records], dim=0)
    keys = records[0][1].keys()
    shared: dict[str, Any] = {}
    per_sample: dict[str, Any] = {}
    for key in keys:
        if key in _FORCED_KWARGS:
            shared[key] = _FORCED_KWARGS[key]
            continue
        values = [kw[key] for _, kw in records]
        if all(_same(values[0], v) for v in values[1:]):
            shared[key] = values[0]
        else:
            per_sample[key] = _stack(_fill_missing_masks(values))
    return BlockInputs(hidden=hidden, shared=shared, per_sample=per_sample)
