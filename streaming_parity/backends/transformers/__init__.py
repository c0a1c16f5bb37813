"""Hugging Face transformers as a peer: NVIDIA's cache-aware streaming FastConformer-RNNT families as transformers 5
runs them (``NemotronAsrStreamingForRNNT``, ``Nemotron3_5AsrForRNNT``).

- ``export.py``: ``parity export-transformers``, a ``.nemo`` written as a transformers checkpoint (the
  conversion script transformers uses is not in its wheel), refusing what its classes cannot express;
- ``directory.py``: a transformers directory read and checked against a ``.nemo`` (every config value, every
  tensor);
- ``backend.py``: ``transformers``, the model driven step by step with its own caches, every tap and cache;
- ``runtime.py``: ``transformers-generate``, its processor and streaming ``generate()`` as its users run it.

Importing this package imports neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streaming_parity.core.errors import InvalidInput


def prepare(nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
            att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
    """The ``.nemo`` written as a transformers checkpoint once per checkpoint (float32 weights: the backends
    load them in the dtype asked, as ``from_pretrained(dtype=...)`` does)."""
    from streaming_parity.backends.transformers.directory import REQUIRED
    from streaming_parity.backends.transformers.export import export_transformers
    from streaming_parity.core.nemo_file import sha256_file

    if dtype not in ("float32", "bfloat16"):
        raise InvalidInput(f"transformers runs float32 or bfloat16, not {dtype}")
    target = Path(work_dir) / f"transformers-{sha256_file(nemo_path)[:16]}"
    if all((target / name).is_file() for name in REQUIRED):
        return target
    export_transformers(nemo_path, target)
    return target


def load(source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
    from streaming_parity.backends.transformers.backend import TransformersBackend

    return TransformersBackend(source, dtype=dtype, nemo_path=nemo_path, **options)


def detect(path: Path) -> str | None:
    from streaming_parity.backends.transformers.directory import describe

    return describe(path)
