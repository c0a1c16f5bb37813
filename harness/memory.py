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
