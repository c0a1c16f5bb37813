"""Peak resident memory of this process, the figure the memory targets are stated in.

``getrusage(...).ru_maxrss`` is wrong for a fresh worker process on Linux: the kernel carries the
high-water mark across ``fork`` and ``execve``, so a spawned child starts at its parent's peak.
``VmHWM`` in ``/proc/self/status`` belongs to the current address space, so it is used where it
exists; elsewhere ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
"""

from __future__ import annotations

import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory image, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only (musl has no mallopt)
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory_promptly(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve allocations of ``threshold_bytes`` and more with their own mappings.

    glibc raises its mmap threshold every time a large block is freed, so after one model is
    closed the next model's tensors come from the heap, and freed heap memory stays in the process:
    a run that loads models one after the other would keep the largest of them resident forever.
    Fixing the threshold (which also turns that adjustment off) returns each freed tensor to the
    system. Returns whether it could be set (glibc on Linux only).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes))


def trim() -> None:
    """Hand free heap memory back to the system now (``malloc_trim``), where glibc allows it."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def current_rss_mb() -> float:
    """Resident set size now, in MiB (0 where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0
