"""Tuning a decoder block over several devices, placed by accelerate.

``device_map`` names the devices blocks are *tuned* on (the reference's meaning; not ``from_pretrained``'s): the
model stays where it was loaded, each block visits the tuning devices for its turn and goes home with its
quantized tensors.  The forms (validated by :meth:`signround.config.AutoRoundConfig.tuning_device`):

* one device (``None``, ``"cpu"``, ``0``, ``"cuda:1"``; ``"auto"`` on a machine with one accelerator): the block
  moves there whole (the engine's own path, no hooks);
* several devices (``"0,1"``, ``"cuda:0,cuda:1"``, ``"0,cpu"``; ``"auto"`` with several accelerators): for each
  block :func:`plan_block` asks accelerate's ``infer_auto_device_map`` where its tuning fits: the whole block on
  the first device of the list that holds it, else split layer by layer over the devices in list order;
* a dict ``{module name or pattern: device}`` (the reference's DeepSeek-V3 example): the modules of every block the
  keys name are tuned on the given devices (:func:`match_map`), the rest of the block on the main device.

The first device of the list (for a dict: its first accelerator, else the CPU) is the *main* device: the cached
block inputs and targets live there (on the host under ``low_gpu_mem_usage``), the block's own computations
(norms, attention arithmetic, residual adds) and the loss run there.  Every placed module carries accelerate's
``AlignDevicesHook(execution_device=its device, io_same_device=True)``: its inputs go to its device, its outputs
come back to the main device, so a block may be cut anywhere, between any two Linears.  The SignRound parameters
of a Linear (rounding offset ``v``, ``alpha``/``beta``) are created from its weight, on its device; the tunable
layer that replaces a Linear for the loop takes the Linear's hook (:class:`Dispatch` follows the swap).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The tuning cost of a Linear, beyond its weight (measured from tuning/block.py and quant/int.py; alpha/beta, one
# per group, aside): per weight element, the rounding offset v in fp32 (4 B) + the codes of the last forward and of
# the kept minibatch winner (1 each, 2 at 7-8 bits) + the dense quantized weight the matmul of the layer being run
# needs (2 in bf16, 4 in fp32; one layer at a time, counted for all as a margin for the allocator): 12 at most.
# The weight is used as stored (no fp32 master) and v's gradient is consumed slice by slice inside the backward.
TUNING_BYTES_PER_WEIGHT = 12
# Per token of one tuning step and per input and output feature of a tuned Linear: its input and output kept for
# backward and their gradients, in fp32 (bf16 needs half).
ACTIVATION_BYTES_PER_FEATURE = 8
# Hidden-state-sized fp32 tensors per token the block's own computations hold on the main device (residual, norm
# outputs, attention internals) during a step.
MAIN_HIDDEN_COPIES = 8
# A budget taken from free memory at run time keeps this share of it (the rest: fragmentation, other users).
FREE_MEMORY_SHARE = 0.9

ACCEPTED_MEMORY_KEYS = "accelerator indices (0, 1), 'cpu' or device names ('cuda:1')"


class PlacementError(RuntimeError):
    """A block does not fit the tuning devices, even split layer by layer."""


def physical(device: str) -> torch.device:
    """The torch device a tuning device name runs on (tests substitute the CPU to run a plan over fake accelerators)."""
    return torch.device(device)


def main_device(device: Sequence[str] | Mapping[str, str]) -> torch.device:
    """Where the streams, the block's own computations and the loss live: a list's first device; a dict's first
    accelerator, else the CPU."""
    return physical(_main_name(device))


def _main_name(device: Sequence[str] | Mapping[str, str]) -> str:
    if isinstance(device, Mapping):
        values = list(dict.fromkeys(str(v) for v in device.values()))
        return next((v for v in values if torch.device(v).type != "cpu"), "cpu")
    return str(device[0])


def _fmt(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


# -- budgets ----------------------------------------------------------------------------------------------------
def memory_budgets(max_memory: Mapping[Any, int | str], devices: Sequence[str]) -> dict[str, int]:
    """``max_memory`` as users pass it to accelerate (``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``; device names
    such as ``"cuda:1"`` also work) -> bytes for each of ``devices``.  Keys naming no tuning device are ignored."""
    from accelerate.utils import convert_file_size_to_int

    budgets: dict[str, int] = {}
    for key, value in max_memory.items():
        size = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
        for device in devices:
            if _names(key, torch.device(device)):
                budgets[device] = size
    missing = [d for d in devices if d not in budgets]
    if missing:
        raise ValueError(
            f"max_memory={dict(max_memory)!r} gives no budget for {', '.join(missing)}; keys: {ACCEPTED_MEMORY_KEYS}"
        )
    return budgets


def _names(key: Any, device: torch.device) -> bool:
    if isinstance(key, str) and key.strip().isdigit():  # JSON keys (the CLI's --max_memory) are strings
        key = int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return device.type != "cpu" and (device.index or 0) == key
    if isinstance(key, torch.device):
        return key == device
    try:
        named = torch.device(str(key))
    except (RuntimeError, TypeError):  # "disk" and other keys accelerate knows but tuning does not use
        return False
    return named.type == device.type and (named.index or 0) == (device.index or 0)


def runtime_budgets(devices: Sequence[str]) -> dict[str, int]:
    """Budgets from what accelerate's ``get_max_memory`` reports free now (the host: available RAM), plus what
    torch's caching allocator holds unused on an accelerator (the previous block's memory, reusable), times
    ``FREE_MEMORY_SHARE``."""
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    budgets = {}
    for device in devices:
        d = torch.device(device)
        size = free.get("cpu" if d.type == "cpu" else (d.index or 0), 0)
        if d.type != "cpu":
            memory = torch.accelerator.memory
            size += memory.memory_reserved(d) - memory.memory_allocated(d)
        budgets[device] = int(size * FREE_MEMORY_SHARE)
    return budgets


def tuning_bytes(block: nn.Module, tuned: Collection[str] | None = None, tokens: int = 0) -> tuple[int, int]:
    """(bytes of the block's weights and buffers, bytes its tuning needs in all): the weights, plus for each tuned
    Linear (``tuned``: names inside the block; None: every Linear) ``TUNING_BYTES_PER_WEIGHT`` per weight element
    and ``ACTIVATION_BYTES_PER_FEATURE`` per token of a step (``tokens`` = batch_size x seqlen) per in/out feature."""
    from accelerate.utils import compute_module_sizes

    size = compute_module_sizes(block)[""]
    extra = 0
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and (tuned is None or name in tuned):
            extra += TUNING_BYTES_PER_WEIGHT * module.weight.numel()
            extra += ACTIVATION_BYTES_PER_FEATURE * tokens * (module.in_features + module.out_features)
    return size, size + extra


def main_reserve(hidden: torch.Tensor, batch_size: int, streams_on_main: bool) -> int:
    """Bytes kept free on the main device besides the layers placed there: ``MAIN_HIDDEN_COPIES`` fp32 hidden
    states per token of a step, and (unless ``low_gpu_mem_usage`` keeps them on the host) four cached streams like
    ``hidden`` (``[n, seqlen, hidden]``): inputs on both paths, targets, outputs."""
    tokens = batch_size * (hidden.shape[1] if hidden.dim() > 2 else 1)
    reserve = MAIN_HIDDEN_COPIES * tokens * hidden.shape[-1] * 4
    return reserve + (4 * hidden.numel() * hidden.element_size() if streams_on_main else 0)


# -- planning -----------------------------------------------------------------------------------------------------
def plan_block(
    block: nn.Module,
    devices: Sequence[str],
    max_memory: Mapping[Any, int | str],
    *,
    tuned: Collection[str] | None = None,
    tokens: int = 0,
    reserve: int | str = 0,
    name: str = "block",
) -> dict[str, str]:
    """Where to tune ``block``: ``{"": device}`` when it fits whole on one device (the first of ``devices`` that
    holds it; the CPU, when the list has accelerators too, only takes what they cannot hold), else ``{submodule
    name: device}`` split layer by layer over ``devices`` in order.  Pure: nothing moves, no device is queried
    (fake device names plan as well as real ones).

    ``max_memory`` is the budget of each device, as users pass it to accelerate; ``reserve`` is kept free on the
    first device (the cached streams and the block's own activations live there).  accelerate's
    ``infer_auto_device_map`` does the placing, on the weights' sizes: the budgets are divided by the block's
    tuning factor (:func:`tuning_bytes`: tuning bytes / weight bytes).  Whole-block pass: the block's class in
    ``no_split_module_classes`` (accelerate's default, blocks are never cut).  Split pass:
    ``no_split_module_classes=[]``, so accelerate may descend to single Linears; that is safe here because every
    placed module returns its outputs to the main device (``io_same_device``), where the block's own arithmetic
    runs.  Tensors a module holds itself beside its children follow that module (no entry of their own).

    Raises :class:`PlacementError` (one line: the block, its need, the budgets) when it does not fit even split.
    """
    from accelerate.utils import convert_file_size_to_int

    devices = list(dict.fromkeys(str(d) for d in devices))
    if not devices:
        raise ValueError("plan_block needs at least one device")
    budgets = memory_budgets(max_memory, devices)
    reserve = convert_file_size_to_int(reserve) if isinstance(reserve, str) else int(reserve)
    size, need = tuning_bytes(block, tuned, tokens)
    if size == 0:
        return {"": devices[0]}
    factor = need / size
    usable = [max(0, budgets[d] - (reserve if i == 0 else 0)) for i, d in enumerate(devices)]
    # Slot 0 is a sentinel without memory: accelerate keeps room for the largest layer on its first accelerator (to
    # bring back layers it would offload, which tuning never does); the sentinel absorbs that reservation.  "disk"
    # (unbounded) collects what fits nowhere.
    slots: dict[int | str, int] = {0: 0, **{i + 1: int(u / factor) for i, u in enumerate(usable)}, "disk": 0}
    holder = nn.Module()
    holder.add_module("block", block)  # so the block itself is a unit accelerate may place whole
    # The host only takes what the accelerators cannot hold: a block fitting no card is split, not sent whole there.
    spill = {i + 1 for i, d in enumerate(devices) if torch.device(d).type == "cpu"}
    whole_slots = {k: 0 if k in spill and len(spill) < len(devices) else v for k, v in slots.items()}
    whole = _infer(holder, whole_slots, [type(block).__name__]).get("block")
    if isinstance(whole, int) and whole > 0:
        return {"": devices[whole - 1]}
    split = _infer(block, slots, [])
    if not split or "disk" in split.values():
        budget_text = ", ".join(f"{d} {_fmt(budgets[d])}" for d in devices)
        kept = f" ({_fmt(reserve)} of {devices[0]} kept for the cached streams)" if reserve else ""
        raise PlacementError(
            f"{name} ({type(block).__name__}) does not fit the tuning devices even split layer by layer: it needs "
            f"about {_fmt(need)} ({_fmt(size)} of weights x {factor:.1f} for the rounding state, codes and "
            f"activations); budgets: {budget_text}{kept}; add devices, raise max_memory or lower batch_size/seqlen"
        )
    if "" in split:
        return {"": devices[max(split[""], 1) - 1]}
    modules = dict(block.named_modules())  # the sentinel holds nothing with a size: anything there is the main's
    return {key: devices[max(slot, 1) - 1] for key, slot in split.items() if key in modules}


def _infer(model: nn.Module, slots: dict[int | str, int], no_split: list[str]) -> dict[str, Any]:
    from accelerate import infer_auto_device_map

    quiet = logging.getLogger("accelerate.utils.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # slots are not device indices: "device N is not available" would be noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(infer_auto_device_map(model, max_memory=dict(slots), no_split_module_classes=no_split))
    finally:
        quiet.setLevel(level)


def match_map(block: nn.Module, mapping: Mapping[str, str], prefix: str = "") -> tuple[dict[str, str], set[str]]:
    """A dict ``device_map`` applied to one block: ``{module name inside the block: device}`` for the modules its
    keys name, and the keys that named one.

    A key names a module by its name inside the block (the reference's DeepSeek-V3 example: ``"mlp.experts.12.
    gate_proj"``; leading dots are ignored), its full name (``prefix`` + name), any dotted tail of the full name, or
    a regular expression matching either name whole.  A named module takes everything under it; a deeper named
    module overrides its ancestor; for one module the first key in the dict wins.  Unnamed modules run on the
    main device.
    """
    patterns = {key: _pattern(key) for key in mapping}
    placed: dict[str, str] = {}
    used: set[str] = set()
    root = prefix.rstrip(".")
    for name, _module in block.named_modules():
        full = f"{prefix}{name}" if name else root
        for key, device in mapping.items():
            if _matches(key.lstrip("."), patterns[key], name, full):
                placed[name] = str(device)
                used.add(key)
                break
    return placed, used


def _pattern(key: str) -> re.Pattern[str] | None:
    try:
        return re.compile(key)
    except re.error:
        return None


def _matches(key: str, pattern: re.Pattern[str] | None, name: str, full: str) -> bool:
    if key and key in (name, full):
        return True
    if key and full and full.endswith("." + key):
        return True
    return pattern is not None and (
        (bool(name) and pattern.fullmatch(name) is not None) or (bool(full) and pattern.fullmatch(full) is not None)
    )


# -- execution ----------------------------------------------------------------------------------------------------
class Dispatch:
    """A block spread over its devices for its tuning, by accelerate's hooks; :meth:`release` sends it home.

    Each tensor of the block moves once, straight to its device (the main device unless it lies under a placed
    module: a block split because it fits no single device never passes whole through one); parameters keep their
    identity (``Module._apply``), so the caller's references and ``requires_grad`` flags hold.  Each placed module
    gets ``AlignDevicesHook(execution_device, io_same_device=True)``, the block one for the main device.  A forward
    pre-hook on the block gives the same hook to a module that replaced a placed one since (the tunable layer the
    SignRound loop swaps in for a Linear calls no hooked forward of the Linear).  Hooks the block carried before
    (a model dispatched by transformers) are set aside and given back.
    """

    def __init__(self, block: nn.Module, device_map: Mapping[str, str], main: str, home: torch.device):
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

        self.block = block
        self.home = home
        self.stashed = [(m, m._hf_hook) for m in block.modules() if getattr(m, "_hf_hook", None) is not None]
        for module, _ in self.stashed:
            remove_hook_from_module(module)
            _drop_forward(module)
        order = {name: i for i, (name, _) in enumerate(block.named_modules())}
        self.main = physical(device_map.get("", main))
        self.entries = {
            name: physical(device_map[name]) for name in sorted(device_map, key=lambda n: order.get(n, -1)) if name
        }  # parents before children: a child's own device overrides its parent's
        self.extra: list[nn.Module] = []
        for name, module in block.named_modules():  # each tensor moves once, straight to its device
            owner = next((e for e in _ancestry(name) if e in self.entries), None)
            device = self.main if owner is None else self.entries[owner]
            module._apply(lambda t, device=device: t.to(device), recurse=False)
        add_hook_to_module(block, AlignDevicesHook(execution_device=self.main, io_same_device=True))
        for name, device in self.entries.items():
            add_hook_to_module(
                block.get_submodule(name), AlignDevicesHook(execution_device=device, io_same_device=True)
            )
        self._hook = AlignDevicesHook
        self._add = add_hook_to_module
        # the hook edits modules: torch.compile must not trace it (disabled here, not by a decorator at import,
        # which would import torch._dynamo and triton with signround)
        self.handle = block.register_forward_pre_hook(torch.compiler.disable(self._follow))

    @property
    def devices(self) -> dict[str, torch.device]:
        """Where each placed module runs (``""``: the block and everything not placed)."""
        return {"": self.main, **self.entries}

    def _follow(self, block: nn.Module, _args: tuple) -> None:
        for name, device in self.entries.items():
            module = block.get_submodule(name)
            if getattr(module, "_hf_hook", None) is None:
                self._add(module, self._hook(execution_device=device, io_same_device=True))
                self.extra.append(module)

    def release(self) -> None:
        """Hooks off (the block's own ones back), the block home."""
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        self.handle.remove()
        for module in [*self.block.modules(), *self.extra]:
            if getattr(module, "_hf_hook", None) is not None:
                remove_hook_from_module(module)
                _drop_forward(module)
        self.extra.clear()
        self.block.to(self.home)
        for module, hook in self.stashed:
            add_hook_to_module(module, hook)
        self.stashed.clear()


def _ancestry(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.b.c", "a.b", "a"]``: a module and its ancestors inside the block, nearest first."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _drop_forward(module: nn.Module) -> None:
    """accelerate leaves the original bound ``forward`` in the module's ``__dict__`` after removing its hook: a
    cycle through the module that keeps it (and the tensors of a discarded tunable layer) alive until a full
    garbage collection."""
    forward = vars(module).get("forward")
    if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


class Spread:
    """Several tuning devices for a block walk: a device list (planned per block) or a dict (given)."""

    def __init__(self, device: Sequence[str] | Mapping[str, str], max_memory: Mapping[Any, int | str] | None = None):
        self.mapping = {str(k): str(v) for k, v in device.items()} if isinstance(device, Mapping) else None
        self.devices = tuple(dict.fromkeys(self.mapping.values() if self.mapping else (str(d) for d in device)))
        self.main = _main_name(device)
        self.max_memory = max_memory
        self.used: set[str] = set()

    @classmethod
    def of(cls, options: Any) -> Spread | None:
        """The engine's several-device placement for ``options.device``; None for one device (the plain path)."""
        device = options.device
        several = isinstance(device, (tuple, list)) and len(set(map(str, device))) > 1
        if isinstance(device, Mapping) or several:
            return cls(device, options.max_memory)
        return None

    def device_map(
        self, block: nn.Module, name: str, tuned: Collection[str], tokens: int, reserve: int
    ) -> dict[str, str]:
        if self.mapping is not None:
            placed, used = match_map(block, self.mapping, f"{name}." if name else "")
            self.used |= used
            return placed
        budgets = memory_budgets(self.max_memory, self.devices) if self.max_memory else runtime_budgets(self.devices)
        return plan_block(block, self.devices, budgets, tuned=tuned, tokens=tokens, reserve=reserve, name=name)

    def dispatch(
        self,
        block: nn.Module,
        name: str,
        tuned: Collection[str],
        hidden: torch.Tensor,
        cache: torch.device,
        batch_size: int,
        home: torch.device,
    ) -> Dispatch:
        """Plan (or match) the block's placement and spread it.  ``hidden``: the cached stream ``[n, seqlen,
        hidden]``; on the main device it takes four such streams (inputs on both paths, targets, outputs)."""
        tokens = batch_size * (hidden.shape[1] if hidden.dim() > 2 else 1)
        reserve = main_reserve(hidden, batch_size, cache == physical(self.main))
        device_map = self.device_map(block, name, tuned, tokens, reserve)
        logger.debug("%s: tuned on %s", name, device_map or {"": self.main})
        return Dispatch(block, device_map, self.main, home)

    def close(self) -> None:
        """After the walk: dict keys that named no module of any block are reported (a typo, or another model's)."""
        if self.mapping is not None:
            unused = [k for k in self.mapping if k not in self.used]
            if unused:
                logger.warning("device_map keys that named no module of the tuned blocks: %s", ", ".join(unused))
