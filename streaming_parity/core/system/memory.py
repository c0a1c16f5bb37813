"""Peak resident memory of this process, the figure the memory targets are stated in.

``getrusage(...).ru_maxrss`` is wrong for a fresh worker process on Linux: the kernel carries the
high-water mark across ``fork`` and ``execve``, so a spawned child starts at its parent's peak.
``VmHWM`` in ``/proc/self/status`` belongs to the current address space, so it is used where it
exists; elsewhere ``ru_maxrss`` (kilobytes on Linux, bytes on macOS).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` in MiB; None where there is no such file or field."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory image, in MiB."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _glibc():
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only (musl has no malloc_trim)
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Hand free heap memory back to the system now (``malloc_trim``, glibc on Linux).

    After a closed model's tensors are freed, glibc keeps much of that memory in its heap, so a
    run that loads models one after the other would stay at the largest model's size; trimming
    returned a closed 0.6B NeMo model's 2.5 GB (3.26 GB resident -> 0.77 GB). Lowering glibc's mmap
    threshold instead (so that every large tensor is its own mapping) returns memory as well but
    made NeMo's streaming step 3x slower (page faults on every allocation), so it is not done.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def current_rss_mb() -> float:
    """Resident set size now, in MiB (0 where /proc is unavailable)."""
    return resident_mb() or 0.0


def resident_mb() -> float | None:
    """Resident set size now, in MiB; None where it cannot be read (no ``/proc``: macOS)."""
    return _proc_status_mb("VmRSS")


def available_mb() -> float | None:
    """Memory the system can give without swapping (``MemAvailable``), in MiB; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None
