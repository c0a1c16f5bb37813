"""ONNX backend: NeMo's cache-aware encoder and ``decoder_joint`` exported to ONNX, run by ONNX Runtime.

- ``streaming_parity.backends.onnx.export``: ``parity export-onnx`` (needs torch + NeMo, at export time only).
- ``streaming_parity.backends.onnx.runtime``: the ``Backend`` over a described export (ONNX Runtime + numpy only),
  its sessions in ``sessions``.
- ``streaming_parity.backends.onnx.described``: what the runtime runs, as a reader describes a directory.
- ``streaming_parity.backends.onnx.layout``: file names, metadata keys and the errors both sides share, and the
  reader of this project's export directories (``describe_export``).
- ``streaming_parity.backends.onnx.foreign_detect`` / ``foreign_read`` / ``foreign_run``: other exporters' files,
  detected (file names only), read (checked against the ``.nemo``, described) and run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InvalidInput


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
            att_context_sizes: Sequence[Sequence[int]] | None = None, format: str = "parity") -> Path:
    """Export fp32 (with the debug tap graphs) and int8 graphs into ``work_dir`` once, cached by sha256.

    One export serves both dtypes, so a suite that compares fp32 and int8 exports only once.
    ``format``: another exporter's files (``streaming_parity.backends.onnx.peer_export``: sherpa-onnx, nemo, parakeet-rs).
    """
    from streaming_parity.backends.onnx.export import export_cached

    if dtype not in ("float32", "int8"):
        raise InvalidInput(f"onnx backend runs float32 or int8, not {dtype}")
    if format != "parity":
        from streaming_parity.backends.onnx.peer_export import export_peer_cached

        contexts = [tuple(int(v) for v in c) for c in att_context_sizes] if att_context_sizes else None
        return export_peer_cached(Path(nemo_path), Path(work_dir), fmt=format, att_context_sizes=contexts,
                                  int8=format == "sherpa-onnx")
    contexts = [tuple(int(v) for v in c) for c in att_context_sizes] if att_context_sizes else None
    return export_cached(Path(nemo_path), Path(work_dir), att_context_sizes=contexts, debug_taps=True,
                         int8=True)


def load(source: Path, *, dtype: str = "float32", nemo_path: Path | None = None, **options: Any):
    """This project's export directory, or another exporter's files (``streaming_parity.backends.onnx.foreign_read``),
    read against ``nemo_path``."""
    from streaming_parity.backends.onnx.foreign_detect import FOREIGN_FORMATS, detect
    from streaming_parity.backends.onnx.foreign_run import ForeignOnnxBackend
    from streaming_parity.backends.onnx.runtime import OnnxBackend

    if detect(source) in FOREIGN_FORMATS:
        return ForeignOnnxBackend(source, dtype=dtype, nemo_path=nemo_path, **options)
    return OnnxBackend(source, dtype=dtype, nemo_path=nemo_path, **options)
