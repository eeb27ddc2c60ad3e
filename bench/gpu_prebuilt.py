"""GPTQModel's CUDA kernels compiled here, on the CPU, for a lent GPU machine: build them, and install them there.

Why: GPTQModel 7.6 compiles Marlin and ExLlamaV2 from source at first use.  On the lent H100 (16 cores) the builds
took 109 s (ExLlamaV2), 222 s (Marlin bf16) and more than 280 s (Marlin fp16, cut) of a 15-minute loan, and Marlin
never ran on that loan (on the next, installed from here, all three loaded in 19 s).  The device image's torch (2.11.0+cu130) is a PyPI wheel, and this machine has nvcc 13.0, so the same
libraries can be compiled here ahead of time, where minutes cost nothing.

    build (here, in a venv with torch==2.11.0 and gptqmodel 7.6.0; ``bash bench/gpu_prebuild.sh`` makes it):
        python bench/gpu_prebuilt.py build .gpucache/prebuilt
    install (on the device, before anything loads a kernel; ``bench/gpu_check.sh`` does it):
        python3 bench/gpu_prebuilt.py install .gpucache/prebuilt

``install`` copies each library into the cache folder that GPTQModel computes on the device for that extension
(``TorchOpsJitExtension.build_root()``, a hash of torch, CUDA, GPU, sources and flags), where its loader looks for a
built library before compiling (``_try_load_prebuilt_library``).  A library that does not load there (another
torch) is skipped by that loader, which then compiles as before: nothing is lost but the time.  ``install`` also
refuses, naming the difference, when the device's torch (with its CUDA), gptqmodel or GPU architecture is not the
one built for.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

EXTENSIONS = ("exllamav2", "marlin_fp16", "marlin_bf16")
MANIFEST = "manifest.json"


def _extension(name: str):
    from gptqmodel import extension

    return extension._extension_for_name(name)


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out_dir: Path, arch: str, names: tuple[str, ...], force: bool = False) -> int:
    """Compile each extension for ``arch`` (e.g. ``9.0``: H100 and H200) and copy its library to ``out_dir``;
    one already there for the same torch, gptqmodel and arch, with its checksum, is kept unless ``force``."""
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    scratch = Path(tempfile.mkdtemp(prefix="gptqmodel_build_"))
    os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"] = str(scratch)
    import gptqmodel
    import torch

    # No GPU here, and GPTQModel's loader refuses to build without one; the arch list above replaces the probe.
    torch.cuda.is_available = lambda: True
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    manifest = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gptqmodel": gptqmodel.__version__,
        "arch": arch,
    }
    earlier = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    same_target = all(earlier.get(key) == value for key, value in manifest.items())
    libraries = manifest["libraries"] = earlier.get("libraries", {}) if same_target else {}
    failed = []
    for name in names:
        kept = libraries.get(name)
        library = out_dir / kept["file"] if kept else None
        if not force and library and library.is_file() and _sha256(library) == kept["sha256"]:
            print(f"{name}: {library} already built for this target (--force to rebuild)")
            continue
        ext = _extension(name)
        started = time.perf_counter()
        if not ext.load():
            print(f"{name}: build failed: {ext.last_error_message()}", file=sys.stderr)
            failed.append(name)
            continue
        built = next(p for p in ext._candidate_binary_paths(ext.build_root()) if p.is_file())
        target = out_dir / f"{name}.so"
        shutil.copyfile(built, target)
        libraries[name] = {"file": target.name, "binary": built.name, "sha256": _sha256(target)}
        seconds = time.perf_counter() - started
        print(f"{name}: {target} ({target.stat().st_size / 2**20:.1f} MiB), compiled in {seconds:.0f} s")
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def built_archs(manifest: dict) -> list[str]:
    """The compute capabilities of ``TORCH_CUDA_ARCH_LIST`` the libraries hold code for (``9.0+PTX`` -> ``9.0``)."""
    return [a.split("+")[0] for a in manifest.get("arch", "").replace(",", ";").split(";") if a]


def mismatch(manifest: dict) -> str | None:
    """Why libraries built for ``manifest`` cannot load on this machine's torch and GPU, or None."""
    import torch

    if manifest.get("torch") != torch.__version__:
        return f"built for torch {manifest.get('torch')}, this is torch {torch.__version__}"
    gptqmodel = _installed_version("gptqmodel")
    if manifest.get("gptqmodel") != gptqmodel:
        return f"built from gptqmodel {manifest.get('gptqmodel')}, this is gptqmodel {gptqmodel}"
    if not torch.cuda.is_available():
        return "no CUDA device here"
    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" not in built_archs(manifest):
        return f"built for compute capability {manifest.get('arch')}, this GPU is {major}.{minor}"
    return None


def install(src_dir: Path) -> int:
    """Put each carried library where GPTQModel's loader looks on this machine; say what was done."""
    manifest = json.loads((src_dir / MANIFEST).read_text())
    reason = mismatch(manifest)
    if reason:
        print(f"prebuilt GPTQModel kernels not installed: {reason}")
        return 1
    for name, entry in manifest["libraries"].items():
        library = src_dir / entry["file"]
        if _sha256(library) != entry["sha256"]:
            print(f"{name}: {library} does not match its checksum; not installed")
            continue
        root = _extension(name).build_root()
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library, root / entry["binary"])
        print(f"{name}: installed in {root}")
    return 0


def check(src_dir: Path) -> int:
    """Here, before a loan: install into a scratch cache as on a GPU of the built arch, then load each library
    through GPTQModel's own loader, which must find it rather than compile (compiling is made to fail)."""
    manifest = json.loads((src_dir / MANIFEST).read_text())
    os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="gptqmodel_check_")
    import torch
    from gptqmodel.utils import cpp

    major, minor = (int(part) for part in built_archs(manifest)[0].split("."))
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: (major, minor)

    def refuse_to_compile(**kwargs) -> None:
        raise RuntimeError(f"{kwargs['name']} would be compiled: the installed library was not found")

    cpp.load = refuse_to_compile
    if install(src_dir):
        return 1
    failed = 0
    for name in manifest["libraries"]:
        ext = _extension(name)
        loaded = ext.load()
        print(f"{name}: {'loaded the installed library' if loaded else ext.last_error_message()}")
        failed += not loaded
    shutil.rmtree(os.environ["GPTQMODEL_TORCH_EXTENSIONS_DIR"], ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_parser = sub.add_parser("build", help="compile here (no GPU needed)")
    build_parser.add_argument("out_dir", type=Path)
    build_parser.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST (9.0: H100 and H200)")
    build_parser.add_argument("--extensions", default=",".join(EXTENSIONS))
    build_parser.add_argument("--force", action="store_true", help="rebuild libraries already built")
    install_parser = sub.add_parser("install", help="on the GPU machine, before any kernel loads")
    install_parser.add_argument("src_dir", type=Path)
    check_parser = sub.add_parser("check", help="here, in the build venv: install and load as on a GPU")
    check_parser.add_argument("src_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.out_dir, args.arch, tuple(args.extensions.split(",")), args.force)
    return {"install": install, "check": check}[args.command](args.src_dir)


if __name__ == "__main__":
    sys.exit(main())
