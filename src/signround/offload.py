"""Models larger than RAM, on accelerate's offloading: the decoder blocks stay on "disk" until their turn.

``low_cpu_mem_usage=True`` loads the model through transformers with every decoder block on accelerate's "disk"
device. For safetensors checkpoints the weights are not copied anywhere: accelerate's hooks read them from the
checkpoint's own shards, memory-mapped. When its turn comes, a block is materialized (its tensors read from its
hooks' weights map onto the requested device, the hooks removed), tuned, packed, and its full-precision Linear
weights are released. At any moment the host holds the packed blocks done so far, one full-precision block, the
embeddings / head, and the calibration streams.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models.layout import find_blocks, head_is_tied


def offload_device_map(skeleton: nn.Module, block_path: str) -> dict[str, str]:
    """A ``device_map`` placing each block at ``block_path`` and the token embeddings / output head on "disk", every
    other module on the CPU.  The embedding table and the head are as large as several blocks; on "disk" they stay
    memory-mapped from the checkpoint (an embedding lookup touches only its rows' pages)."""
    blocks = skeleton.get_submodule(block_path)
    on_disk = {f"{block_path}.{i}" for i in range(len(blocks))}
    names = {id(m): n for n, m in skeleton.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(skeleton, getter, lambda: None)()
        if module is not None and id(module) in names:
            on_disk.add(names[id(module)])

    def cover(module: nn.Module, prefix: str) -> dict[str, str]:
        entries: dict[str, str] = {}
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in on_disk:
                entries[full] = "disk"
            elif any(path.startswith(full + ".") for path in on_disk):
                entries.update(cover(child, full + "."))
            else:
                entries[full] = "cpu"
        for name, _ in module.named_parameters(recurse=False):  # a tensor held by a module on the path itself
            entries[f"{prefix}{name}"] = "cpu"
        return entries

    return cover(skeleton, "")


def is_offloaded(block: nn.Module) -> bool:
    """Whether accelerate's hooks hold some of the block's weights (they sit on the meta device until a forward)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in block.modules())


@torch.no_grad()
def materialize(block: nn.Module, device: torch.device | str) -> None:
    """Read an offloaded block's tensors onto ``device`` from its hooks' weights maps, then remove the hooks: the
    block becomes an ordinary module for its tuning (accelerate's own utilities, no loader of ours)."""
    from accelerate.utils import set_module_tensor_to_device

    for module in block.modules():
        hook: Any = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.device.type == "meta":
                set_module_tensor_to_device(module, name, device, value=weights[name])
    _remove_hooks(block)
    for module in block.modules():  # fused MoE experts unfused while offloaded: their per-expert weights now
        source = getattr(module, "fused_source", None)
        if source is not None:
            module.fill_from({name: source[name].to(device) for name in module.fused_names()})
            module.fused_source = None
    leftover = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"tensors {leftover[:5]} of an offloaded block could not be read from its weights map")


def detach(block: nn.Module) -> None:
    """Forget an offloaded block's hooks without reading its weights (they stay on the meta device)."""
    _remove_hooks(block)


def settle(model: nn.Module) -> None:
    """After a walk that read every offloaded block into host memory: a model whose ``device_map`` was only "cpu"
    and "disk" is a plain CPU model again (hooks removed), else ``save_pretrained`` treats it as offloaded.  Modules
    still on "disk" (the embeddings and head under ``low_cpu_mem_usage``) are read now: memory-mapped from the
    checkpoint, so this costs pages only where they are touched."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not set(map(str, device_map.values())) <= {"cpu", "disk"}:
        return
    if any(is_offloaded(block) for block in find_blocks(model)[1]):  # the walk did not read them all
        return
    for module in [m for m in model.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]:
        materialize(module, "cpu")
    _remove_hooks(model)
    del model.hf_device_map
    if head_is_tied(model):  # read as two tensors from "disk": one table again, as the config says
        model.tie_weights()


def _remove_hooks(module: nn.Module) -> None:
    """accelerate's ``remove_hook_from_module``, then drop the ``forward`` it leaves in each module's ``__dict__``:
    that bound method refers back to its module, a cycle that keeps every replaced full-precision layer alive
    until the garbage collector's next full pass (measured: the fp weights of every block stayed resident)."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module, recurse=True)
    for m in module.modules():
        forward = vars(m).get("forward")
        if forward is not None and getattr(forward, "__func__", None) is type(m).forward:
            del m.forward
