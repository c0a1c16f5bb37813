"""ONNX backend: NeMo's cache-aware encoder and ``decoder_joint`` exported to ONNX, run by ONNX Runtime.

- ``backends.onnx.export``: ``parity export-onnx`` (needs torch + NeMo, at export time only).
- ``backends.onnx.runtime``: the ``Backend`` over an export directory (ONNX Runtime + numpy only).
- ``backends.onnx.layout``: file names, metadata keys and the errors both sides share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.errors import InvalidInput


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
            att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
    """Export fp32 (with the debug tap graphs) and int8 graphs into ``work_dir`` once, cached by sha256.

    One export serves both dtypes, so a suite that compares fp32 and int8 exports only once.
    """
    from backends.onnx.export import export_cached

    if dtype not in ("float32", "int8"):
        raise InvalidInput(f"onnx backend runs float32 or int8, not {dtype}")
    contexts = [tuple(int(v) for v in c) for c in att_context_sizes] if att_context_sizes else None
    return export_cached(Path(nemo_path), Path(work_dir), att_context_sizes=contexts, debug_taps=True,
                         int8=True)


def load(source: Path, *, dtype: str = "float32", nemo_path: Path | None = None, **options: Any):
    from backends.onnx.runtime import OnnxBackend

    return OnnxBackend(source, dtype=dtype, nemo_path=nemo_path, **options)
