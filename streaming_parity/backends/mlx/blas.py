"""An optimized BLAS for MLX on Linux, loaded before ``mlx.core`` so that MLX uses it.

The ``mlx-cpu`` wheel links netlib's reference BLAS: a 2048x2048 float32 matmul runs at a few
GFLOP/s, against hundreds with OpenBLAS on the same machine. Loading an OpenBLAS shared library
with ``RTLD_GLOBAL`` *before* the first ``import mlx.core`` puts its ``cblas_*`` symbols in the
process's global scope, which the dynamic linker searches before the wheel's own
``libblas``; the effect is that of ``LD_PRELOAD`` without the user having to know. It must happen
first: once ``mlx.core`` is loaded its BLAS is bound, so a late call only reports that.

``PARITY_MLX_BLAS`` overrides the search: a path to a BLAS library, or ``reference`` to keep the
wheel's netlib BLAS (for measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass

from streaming_parity.core.errors import InvalidInput

ENVIRONMENT_VARIABLE = "PARITY_MLX_BLAS"

# Debian/Ubuntu alternatives first (libopenblas0-pthread / -openmp), then plain library names.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)


@dataclass(frozen=True)
class BlasStatus:
    library: str | None  # the optimized library now serving MLX, or None
    reason: str  # one line for the user and for parity.json

    @property
    def optimized(self) -> bool:
        return self.library is not None


_STATUS: BlasStatus | None = None


def _candidates() -> list[str]:
    found = list(CANDIDATES)
    for name in ("openblas", "openblasp"):
        located = ctypes.util.find_library(name)
        if located:
            found.append(located)
    return found


def _try_load(path: str) -> bool:
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(library, "cblas_sgemm")


def use_optimized_blas() -> BlasStatus:
    """Load an optimized BLAS for MLX once per process; warn in one line when none is available."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    if not sys.platform.startswith("linux"):
        _STATUS = BlasStatus(None, "not Linux: MLX uses the platform's BLAS (Accelerate on macOS)")
        return _STATUS
    choice = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if choice.lower() in ("reference", "none", "netlib"):
        _STATUS = BlasStatus(None, f"{ENVIRONMENT_VARIABLE}={choice}: MLX keeps the wheel's reference BLAS")
        return _STATUS
    if importlib.util.find_spec("mlx") is None:
        _STATUS = BlasStatus(None, "mlx is not installed")
        return _STATUS
    if "mlx.core" in sys.modules:
        _STATUS = BlasStatus(None, "mlx.core was imported before streaming_parity.backends.mlx; its BLAS is already bound")
        warnings.warn("MLX on Linux: mlx.core was imported before streaming_parity.backends.mlx, so the reference BLAS stays in "
                      "use (slow); import streaming_parity.backends.mlx first or set LD_PRELOAD to an OpenBLAS library",
                      RuntimeWarning, stacklevel=2)
        return _STATUS
    paths = [choice] if choice else _candidates()
    for path in paths:
        if os.path.isabs(path) and not os.path.exists(path):
            continue
        if _try_load(path):
            _STATUS = BlasStatus(path, f"optimized BLAS loaded for MLX: {path}")
            return _STATUS
    if choice:
        raise InvalidInput(f"{ENVIRONMENT_VARIABLE}={choice}: not a loadable BLAS library with cblas_sgemm")
    _STATUS = BlasStatus(None, "no optimized BLAS found; MLX uses the wheel's reference BLAS")
    print("warning: MLX on Linux CPU is using the reference BLAS (slow matmuls); install OpenBLAS "
          "(Debian/Ubuntu: apt install libopenblas0-pthread) to make it fast", file=sys.stderr)
    return _STATUS


def status() -> BlasStatus:
    return _STATUS if _STATUS is not None else use_optimized_blas()
