"""Process-level settings of a quantization run: deterministic algorithms, and the resources it used."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import torch


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``enable_deterministic_algorithms`` (the reference's name): torch's deterministic kernels for the run, and
    the cuBLAS workspace setting they need on CUDA; both restored afterwards."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if previous_env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        if previous_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Each block walk frees a block's worth of tensors; glibc's growing mmap threshold keeps such freed chunks in the
    heap, where later allocations fragment them, and the process's RSS keeps growing block after block under
    ``low_cpu_mem_usage``.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with suppress(OSError, AttributeError):  # not glibc (musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_host_rss_bytes() -> int:
    """Peak resident set size of this process so far (memory-mapped pages it touched included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def peak_device_bytes() -> tuple[str, int] | None:
    """(accelerator, peak bytes allocated on it) when the process used one, else None."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or not accelerator.is_available():
        return None
    device = accelerator.current_accelerator()
    try:
        return str(device), int(accelerator.max_memory_allocated())
    except (AttributeError, RuntimeError):  # an accelerator without memory statistics
        return None


def summary(started: float) -> str:
    """One line for the end of a run: wall time, peak host RSS, peak device memory."""
    line = f"{time.perf_counter() - started:.1f} s, peak host RSS {peak_host_rss_bytes() / 2**30:.2f} GiB"
    device = peak_device_bytes()
    if device is not None:
        line += f", peak {device[0]} memory {device[1] / 2**30:.2f} GiB"
    return line
