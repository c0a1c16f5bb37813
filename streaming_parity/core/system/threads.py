"""How many threads the numeric libraries may use: one setting for torch, BLAS, OpenMP and ONNX Runtime.

Each framework keeps its own pool and reads its limit at a different moment: OpenMP, OpenBLAS
and MKL read environment variables when they load, torch reads ``OMP_NUM_THREADS`` at import
(``torch.set_num_threads`` after), and ONNX Runtime takes it per session
(``SessionOptions.intra_op_num_threads``) and ignores the environment. ``limit_threads`` sets all
of them, including for subprocesses (the bounded-memory nightly and the benchmark spawn some),
which inherit the environment.
"""

from __future__ import annotations

import os
import sys

from streaming_parity.core.errors import InvalidInput

# Read by the BLAS/OpenMP runtimes when they load.
LIBRARY_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
# This project's own record of the limit, read by the ONNX backend when it opens sessions.
PROJECT_VARIABLE = "PARITY_THREADS"


def requested_threads() -> int | None:
    """The limit set by ``limit_threads`` in this process or a parent, or None (library defaults)."""
    value = os.environ.get(PROJECT_VARIABLE)
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise InvalidInput(f"{PROJECT_VARIABLE}={value!r}: expected a positive integer")
    return threads


def limit_threads(threads: int, *, only_default: bool = False) -> None:
    """Limit every numeric library of this process, and of processes it starts, to ``threads``.

    ``only_default`` keeps limits already present in the environment (a caller's explicit choice).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    for variable in (*LIBRARY_VARIABLES, PROJECT_VARIABLE):
        if only_default:
            os.environ.setdefault(variable, str(threads))
        else:
            os.environ[variable] = str(threads)
    if "torch" in sys.modules:  # already imported: its pool was sized at import
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]))  # BLAS libraries loaded before this call
