"""Resuming a killed run from its last finished block.

A run that will save to ``out`` keeps its work in ``out``'s parent, in ``.out.signround-resume/``. The output
path itself is never written before the final atomic save. After every block the work directory receives:

* the block's quantized tensors and its tuned norm weights (``block-0003.safetensors``, written once, never
  changed);
* the two streams that feed the next block (``streams-0004.safetensors``; the previous one is deleted after);
* ``state.json``, replaced atomically last: it names the block files and the streams file of the last state.

Rerunning the same command finds the work directory and checks its fingerprint. A different model,
quantization config or calibration data is refused, naming which of them changed. Otherwise the run continues
after the last finished block. A successful save removes the work directory. Every file is written to a
temporary name first and then renamed, so a kill at any moment leaves the last complete state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .quant.dispatch import from_tensors, to_tensors
from .tuning.engine import BlockCheckpoint, TuneReport

logger = logging.getLogger(__name__)

_STATE = "state.json"
_NORM = "norm::"  # block-file key prefix of a tuned norm weight (enable_norm_bias_tuning), by parameter name


def work_dir_for(output_dir: str | os.PathLike) -> Path:
    """Where a run saving to ``output_dir`` keeps its resumable work (beside it, never inside it)."""
    out = Path(output_dir).expanduser().resolve()
    return out.parent / f".{out.name}.signround-resume"


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


SAMPLE_RUNS, SAMPLE_RUN_LENGTH = 4, 1024


def _sample_starts(numel: int) -> list[int]:
    """Where the sample's runs start in a flattened tensor of ``numel`` values (it is whole when that small)."""
    return torch.linspace(0, numel - SAMPLE_RUN_LENGTH, SAMPLE_RUNS).long().tolist()


def _weight_sample(p: torch.Tensor) -> torch.Tensor:
    """4 evenly spaced runs of 1024 consecutive values.  Each run faults in one read-around window (about 2 MB)
    of a memory-mapped weight, where a strided sample of single values faults in nearly every page of it,
    keeping a checkpoint's embeddings and head resident for the whole run."""
    flat = p.detach().reshape(-1)
    if flat.numel() <= SAMPLE_RUNS * SAMPLE_RUN_LENGTH:
        return flat.float()
    return torch.cat([flat[s : s + SAMPLE_RUN_LENGTH] for s in _sample_starts(flat.numel())]).float()


def _offloaded_sample(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor | None:
    """``_weight_sample`` of an offloaded parameter (on the meta device under ``low_cpu_mem_usage``), read from the
    checkpoint file accelerate's hook maps it to: the same runs as slices (the same few pages), cast to the
    parameter's dtype as loading does, so a run fingerprints alike in both placements and resumes across them.
    None where the hook names no file or the stored tensor is not the parameter's shape (converted on load)."""
    from safetensors import safe_open

    module_name, _, attr = name.rpartition(".")
    hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    index = getattr(getattr(weights, "dataset", None), "index", None)
    entry = index.get(getattr(weights, "prefix", "") + attr) if isinstance(index, dict) else None
    if not entry or "safetensors_file" not in entry:
        return None
    with safe_open(entry["safetensors_file"], framework="pt") as f:
        stored = f.get_slice(entry.get("weight_name", name))
        if tuple(stored.get_shape()) != tuple(p.shape):
            return None
        if p.numel() <= SAMPLE_RUNS * SAMPLE_RUN_LENGTH or p.dim() < 2:
            return _weight_sample(f.get_tensor(entry.get("weight_name", name)).to(p.dtype))
        row = p.numel() // p.shape[0]
        runs = []
        for s in _sample_starts(p.numel()):  # the rows holding each run, read as one slice
            first, last = s // row, (s + SAMPLE_RUN_LENGTH - 1) // row + 1
            runs.append(stored[first:last].reshape(-1)[s - first * row : s - first * row + SAMPLE_RUN_LENGTH])
        return torch.cat(runs).to(p.dtype).float()


def _weights_digest(model: nn.Module) -> str:
    """Every parameter's name, shape and dtype, plus a sample of its values (4096 at most), so that the digest
    of a multi-billion-parameter model takes milliseconds, reads a few pages and still tells two checkpoints
    apart.  An offloaded parameter's sample is read from its checkpoint file (``_offloaded_sample``)."""
    parts: list[Any] = []
    for name, p in model.named_parameters():
        parts += [name, tuple(p.shape), str(p.dtype)]
        sample = _offloaded_sample(model, name, p) if p.device.type == "meta" else _weight_sample(p)
        if sample is not None:  # else: its checkpoint files (below) stand for its values
            parts.append(sample)
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if source.is_dir():
        parts += [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(source.glob("*.safetensors"))]
    return _digest(*parts)


def fingerprint(model: nn.Module, config_description: dict[str, Any], input_ids: torch.Tensor) -> dict[str, str]:
    """What must be equal for a run to continue another: the model, the quantization config, the data."""
    model_config = model.config.to_dict() if hasattr(model, "config") else {}
    model_config = {k: v for k, v in model_config.items() if k not in ("_name_or_path", "transformers_version")}
    return {
        "model": _digest(model_config, _weights_digest(model)),
        "config": _digest(config_description),
        "data": _digest(input_ids),
    }


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file that appears whole or not at all (written beside, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


@dataclass
class ResumeStore:
    """The work directory of one run, checked against that run's fingerprint."""

    directory: Path
    fingerprint: dict[str, str]

    def load(self) -> BlockCheckpoint | None:
        """The last finished block's checkpoint, or None when there is nothing to resume.  A work directory
        left by a run with another model / config / data is an error naming what differs."""
        state_file = self.directory / _STATE
        if not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        changed = [k for k, v in self.fingerprint.items() if state["fingerprint"].get(k) != v]
        if changed:
            raise ValueError(
                f"cannot resume from {str(self.directory)!r}: the {' and the '.join(changed)} "
                f"{'differs' if len(changed) == 1 else 'differ'} from the interrupted run's; delete that directory "
                "to start over"
            )
        report = TuneReport(
            block_losses=[tuple(x) for x in state["block_losses"]],
            expert_tokens=dict(state["expert_tokens"]),
        )
        for block_file in state["block_files"]:
            tensors = load_file(str(self.directory / block_file))
            specs = json.loads((self.directory / block_file).with_suffix(".json").read_text())
            for name, description in specs.items():
                prefix = f"{name}."
                mine = {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
                report.quantized[name] = from_tensors(mine, description)
            report.norms.update({k[len(_NORM) :]: t for k, t in tensors.items() if k.startswith(_NORM)})
        streams = load_file(str(self.directory / state["streams"]))
        logger.info(
            "resuming from %s: blocks 0-%d already tuned, continuing at block %d",
            self.directory, state["next_block"] - 1, state["next_block"],
        )  # fmt: skip
        fp_hidden = streams["fp_hidden"]
        return BlockCheckpoint(state["next_block"], fp_hidden, streams.get("q_hidden", fp_hidden), report)

    def save(self, checkpoint: BlockCheckpoint, known: set[str]) -> None:
        """Record a finished block: its new quantized tensors (those not in ``known``), the streams, the state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        index = checkpoint.next_block - 1
        new = {n: qt for n, qt in checkpoint.report.quantized.items() if n not in known}
        block_file = f"block-{index:04d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        descriptions = {}
        for name, qt in new.items():
            parts, descriptions[name] = to_tensors(qt)
            tensors.update({f"{name}.{k}": t for k, t in parts.items()})
        new_norms = {n: t for n, t in checkpoint.report.norms.items() if n not in known}
        tensors.update({_NORM + n: t for n, t in new_norms.items()})
        atomic_save_tensors(self.directory / block_file, tensors)
        _atomic_write_json((self.directory / block_file).with_suffix(".json"), descriptions)
        streams_file = f"streams-{checkpoint.next_block:04d}.safetensors"
        streams = {"fp_hidden": checkpoint.fp_hidden}
        if checkpoint.q_hidden is not checkpoint.fp_hidden:  # one stream without quantized inputs: written once
            streams["q_hidden"] = checkpoint.q_hidden
        atomic_save_tensors(self.directory / streams_file, streams)
        previous = self._state()
        _atomic_write_json(
            self.directory / _STATE,
            {
                "fingerprint": self.fingerprint,
                "next_block": checkpoint.next_block,
                "block_files": [*previous.get("block_files", []), block_file],
                "streams": streams_file,
                "block_losses": checkpoint.report.block_losses,
                "expert_tokens": checkpoint.report.expert_tokens,
            },
        )
        if previous.get("streams") and previous["streams"] != streams_file:
            (self.directory / previous["streams"]).unlink(missing_ok=True)
        known.update(new)
        known.update(new_norms)

    def _state(self) -> dict[str, Any]:
        state_file = self.directory / _STATE
        return json.loads(state_file.read_text()) if state_file.is_file() else {}

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
