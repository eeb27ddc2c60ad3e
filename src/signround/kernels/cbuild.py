"""Compile a C kernel shipped with the package for this machine's CPU, once, and load it with ctypes.

Why compile at first use: a wheel cannot know the user's CPU, and ``-march=native`` lets the compiler use every
vector extension the machine has (AVX-512, AVX2, NEON) from one portable source.  Plain C against raw pointers
compiles in well under a second, where a torch C++ extension would need torch's headers and a minute.  The library
is cached under ``$SIGNROUND_CACHE/kernels`` (default ``~/.cache/signround/kernels``), keyed by the source, the
compiler and the CPU, and written atomically (compiled to a temporary name, renamed), so concurrent processes
and interrupted builds never load a partial file.

OpenMP: the library is linked by soname against ``libgomp.so.1``.  torch's CPU wheels load their own
``libgomp.so.1`` first, and the dynamic linker resolves ours to that already-loaded copy, so the kernel shares
torch's thread pool and ``torch.set_num_threads`` instead of starting a second pool that would fight it for cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..fetch import signround_cache

__all__ = ["BuildError", "build_library", "cache_dir", "find_compiler"]

logger = logging.getLogger(__name__)

_COMPILERS = ("cc", "gcc", "clang")
_BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC")


class BuildError(RuntimeError):
    """The C kernel could not be compiled or loaded; the message says which step failed."""


def cache_dir() -> Path:
    return signround_cache() / "kernels"


def find_compiler() -> str | None:
    """``$CC`` if set, else the first of cc / gcc / clang on ``PATH``; ``None`` if there is none."""
    if cc := os.environ.get("CC"):
        return shutil.which(cc)
    return next((path for name in _COMPILERS if (path := shutil.which(name))), None)


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"C compiler {compiler} does not run: {err}") from None


def build_library(source: Path, march: str = "native", defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile ``source`` (once per source / compiler / CPU / ``march`` / extra ``-D`` / ``-U`` flags) and load it.

    Tries ``-fopenmp`` first and builds without it (single-threaded kernel) if the compiler lacks OpenMP.
    Raises :class:`BuildError` naming what is missing (compiler, source, a writable cache) or the compiler's error.
    """
    compiler = find_compiler()
    if compiler is None:
        wanted = f"$CC={os.environ['CC']!r}" if os.environ.get("CC") else " / ".join(_COMPILERS)
        raise BuildError(f"no C compiler found ({wanted} not on PATH; install a C compiler, or set CC)")
    try:
        text = source.read_bytes()
    except OSError as err:
        raise BuildError(f"kernel source {source} cannot be read ({err}); reinstall signround") from None
    parts = (text, compiler, _compiler_version(compiler), march, *defines, _cpu_identity())
    key = hashlib.sha256(b"\0".join(p if isinstance(p, bytes) else p.encode() for p in parts)).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{march}-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _compile(compiler, source, target, (f"-march={march}", *defines))
        except OSError as err:
            raise BuildError(
                f"cannot write the kernel cache {target.parent} ({err}); set SIGNROUND_CACHE to a writable directory"
            ) from None
    try:
        return ctypes.CDLL(str(target))
    except OSError as err:
        raise BuildError(f"loading {target} failed: {err}") from None


def _compile(compiler: str, source: Path, target: Path, flags: tuple[str, ...]) -> None:
    """Compile into a temporary file beside ``target`` and rename it into place (with OpenMP, else without)."""
    errors = []
    for openmp in (("-fopenmp",), ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [compiler, *_BASE_FLAGS, *flags, *openmp, "-o", tmp, str(source)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            failure = result.stderr.strip() if result.returncode else None
        except (OSError, subprocess.SubprocessError) as err:  # a compiler that hangs or cannot start
            failure = str(err)
        if failure is None:
            os.replace(tmp, target)
            logger.info("compiled %s for this CPU into %s", source.name, target)
            return
        os.unlink(tmp)
        errors.append(f"{' '.join(command)}:\n{failure}")
    raise BuildError(f"compiling {source.name} failed:\n" + "\n".join(errors))
