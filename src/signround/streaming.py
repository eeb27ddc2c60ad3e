"""Streaming save: each packed decoder block goes to its own safetensors shard as soon as it is finished.

With ``low_cpu_mem_usage`` and a known output (``quantize_and_save``, the CLI), a tuned block is packed, written
to ``<work dir>/shards/block-NNNNN.safetensors`` under the names ``save_pretrained`` would give its tensors
(transformers' own ``revert_weight_conversion``), and released (its tensors go to the meta device).  The host then
never holds more than one block beyond the embeddings and head.  At the end ``save_pretrained`` writes everything
else (config, embeddings, head, ...) while the quantizer leaves the streamed blocks out of its state dict
(:meth:`signround.hf_quantizer.SignRoundHfQuantizer.get_state_dict_and_metadata`), and :meth:`BlockShards.finish`
links the block shards next to transformers' own file(s), numbers them ``model-0000i-of-0000N.safetensors`` and
writes the index.  All of that happens in the output's temporary directory, which then appears at once.

The shard of a block is written before the resume record of that block, so a resumed run finds a shard for every
block it skips, and writes byte-identical shards for the others.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
}  # else 1


class BlockShards:
    """The shard files of streamed blocks, and which of the model's tensors they hold (by in-memory prefix)."""

    def __init__(self, directory: str | os.PathLike, block_path: str):
        self.directory = Path(directory)
        self.block_path = block_path
        self.streamed: list[int] = []
        self.finished = False  # finish() put the shards into an output

    def file(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def prefix(self, index: int) -> str:
        return f"{self.block_path}.{index}."

    @property
    def prefixes(self) -> tuple[str, ...]:
        """In-memory name prefixes of the streamed blocks: ``save_pretrained`` must leave these tensors out."""
        return tuple(self.prefix(i) for i in self.streamed)

    @torch.no_grad()
    def write(self, model: nn.Module, index: int) -> Path:
        """Write block ``index`` of ``model`` (packed) to its shard, atomically, under its on-disk names."""
        from transformers.core_model_loading import revert_weight_conversion

        from .resume import atomic_save_tensors

        block = model.get_submodule(self.block_path)[index]
        tensors = {name: t.detach().contiguous() for name, t in block.state_dict(prefix=self.prefix(index)).items()}
        meta = [name for name, t in tensors.items() if t.device.type == "meta"]
        if meta:
            raise RuntimeError(f"block {index} still has tensors on the meta device, cannot stream it: {meta[:5]}")
        ignored = getattr(model, "_keys_to_ignore_on_save", None) or []
        tensors = {name: t for name, t in tensors.items() if name not in ignored}
        tensors = revert_weight_conversion(model, {k: v.cpu() for k, v in tensors.items()})
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(self.file(index), tensors, metadata={"format": "pt"})
        return self.file(index)

    def release(self, model: nn.Module, index: int) -> None:
        """Block ``index`` is on disk: drop its tensors (meta device) and leave it out of the final save."""
        model.get_submodule(self.block_path)[index].to("meta")
        if index not in self.streamed:
            self.streamed.append(index)

    def refuse_released(self, model: nn.Module) -> None:
        """After the save: running a streamed block raises an error naming it and what to do (instead of torch's
        complaint about meta tensors).  Not before: the calibration pass of a resumed run stops at block 0."""
        blocks = model.get_submodule(self.block_path)
        for index in self.streamed:
            blocks[index].register_forward_pre_hook(_released(self.prefix(index)[:-1]))

    def finish(self, target: Path) -> None:
        """Join the block shards with the weights ``save_pretrained`` wrote into ``target``: one numbered series
        ``model-0000i-of-0000N.safetensors`` (blocks first) and its index."""
        theirs = _weight_files(target)
        ours = [self.file(i) for i in sorted(self.streamed)]
        missing = [str(f) for f in ours if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"streamed block shards are missing: {missing[:3]}")
        total = len(ours) + len(theirs)
        weight_map: dict[str, str] = {}
        total_size = 0
        staged = []
        for number, source in enumerate([*ours, *theirs], start=1):
            name = f"model-{number:05d}-of-{total:05d}.safetensors"
            staging = target / f".{name}.part"
            if source.parent == target:
                os.replace(source, staging)
            else:  # linked, not moved: a kill during the save leaves the work dir's shards for the rerun
                _link_or_copy(source, staging)
            staged.append((staging, target / name))
            for key, nbytes in tensor_bytes(staging).items():
                if key in weight_map:
                    raise ValueError(f"tensor {key!r} is written twice ({weight_map[key]} and {name})")
                weight_map[key] = name
                total_size += nbytes
        (target / SAFE_WEIGHTS).unlink(missing_ok=True)
        (target / SAFE_INDEX).unlink(missing_ok=True)
        for staging, final in staged:
            os.replace(staging, final)
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (target / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        self.finished = True


def _released(name: str) -> Callable[..., None]:
    def refuse(_module: nn.Module, _args: Any) -> None:
        raise RuntimeError(
            f"{name} was streamed to the saved output and released from memory (low_cpu_mem_usage): load the "
            "saved output to run the model, or quantize with low_cpu_mem_usage=False to keep every block in memory"
        )

    return refuse


def output_digests(directory: str | os.PathLike, files: bool = True) -> dict[str, str]:
    """sha256 of every tensor of a saved output by name, whichever shard holds it, and (``files``) of every other
    file but the shard index: equal for a streamed save and an in-memory one of the same model."""
    import hashlib

    digests = {}
    for f in sorted(Path(directory).iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                    t = handle.get_tensor(name).contiguous()
                    raw = t.view(-1).view(torch.uint8).numpy().tobytes()
                    digests[name] = f"{t.dtype}{tuple(t.shape)} {hashlib.sha256(raw).hexdigest()}"
        elif files and f.is_file() and f.name != SAFE_INDEX:
            digests[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (the work dir sits beside the output, on the same filesystem), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors weight files ``save_pretrained`` wrote: its index's files in order, or the single file."""
    index = directory / SAFE_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    single = directory / SAFE_WEIGHTS
    return [single] if single.is_file() else []


def tensor_bytes(path: Path) -> dict[str, int]:
    """Tensor name -> its size in bytes, from a safetensors header."""
    sizes = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            piece = handle.get_slice(name)
            nbytes = _DTYPE_BYTES.get(piece.get_dtype(), 1)
            for dim in piece.get_shape():
                nbytes *= dim
            sizes[name] = nbytes
    return sizes
