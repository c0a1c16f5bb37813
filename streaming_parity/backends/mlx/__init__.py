"""The MLX backend: a converter to a verified MLX artifact, and a cache-aware streaming MLX runtime.

- ``model.py``    the FastConformer-RNNT in MLX (one readable file)
- ``mapping.py``  the NeMo -> MLX weight mapping table
- ``convert.py``  ``parity convert``: strict, streaming, atomic conversion
- ``verify.py``   the NeMo-vs-MLX numeric check behind ``convert`` and ``parity verify``
- ``backend.py``  the ``streaming_parity.interface.backend.Backend`` implementation
- ``blas.py``     an optimized BLAS for MLX on Linux CPU

The optimized BLAS (``blas.py``) is loaded by the modules that import ``mlx.core`` (``model.py``,
``backend.py``), right before they do, and not by importing this package: in a process that
also runs NeMo, a preloaded OpenBLAS takes over torch's matrix products and made a full-size NeMo
streaming step 3.5x slower (0.48 -> 1.68 s), so the CLI and the nightly load it only once an MLX
model is actually used. Nothing here imports MLX, torch or NeMo at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
            att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
    """Convert ``nemo_path`` into ``work_dir`` once (keyed by the checkpoint's sha256 and dtype).

    Unverified: the suites that call ``prepare`` run the comparison themselves.
    """
    from streaming_parity.backends.mlx.convert import convert
    from streaming_parity.core.nemo_file import sha256_file

    target = Path(work_dir) / f"mlx-{sha256_file(nemo_path)[:16]}-{dtype}"
    if not (target / "model.safetensors").exists():
        convert(nemo_path, target, dtype=dtype, skip_verify=True, overwrite=target.exists())
    return target


def load(source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
    """Open an artifact directory; ``dtype``, when given, must be the artifact's."""
    from streaming_parity.backends.mlx.backend import MLXBackend

    return MLXBackend(source, dtype=dtype, **options)


def tensors_as_source(source: Path):
    """Every artifact tensor mapped back to the NeMo name(s) and layout it came from.

    Yields ``(artifact name, NeMo source names, array in NeMo layout, relative tolerance)``; a
    summed LSTM bias yields both source names (compared against their sum). The tolerance is the
    rounding of the artifact's dtype: 0 for float32 except a sum's single rounding.
    """
    import numpy as np

    from streaming_parity.backends.mlx import mapping
    from streaming_parity.backends.mlx.artifact import iter_tensors, read_artifact_dtype

    epsilon = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[read_artifact_dtype(Path(source))]
    for file in (mapping.MODEL_FILE, mapping.FRONTEND_FILE):
        if file == mapping.FRONTEND_FILE and not (Path(source) / file).exists():
            continue
        for name, array in iter_tensors(Path(source), file):
            for source_names, restored in mapping.to_nemo(name, array, file):
                rounding = 2.0 ** -23 if len(source_names) > 1 else 0.0
                tolerance = epsilon if file == mapping.MODEL_FILE else 0.0
                yield name, tuple(source_names), np.asarray(restored), max(tolerance, rounding)
