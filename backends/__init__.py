"""The backend registry. A backend appears in every suite, the CLI and the nightly run by registering here.

Each entry names a module that provides two functions:

- ``prepare(nemo_path, work_dir, *, dtype, att_context_sizes) -> Path``: turn a ``.nemo`` into what
  the backend loads (the ``.nemo`` itself, an ONNX export directory, an MLX artifact directory);
  cached under ``work_dir`` by the caller.
- ``load(source, *, dtype, nemo_path=None) -> harness.streaming.Backend``.

``requires`` lists the Python modules the backend imports; suites skip a backend whose modules
cannot be imported, with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str
    requires: tuple[str, ...]
    dtypes: tuple[str, ...]  # the first is the one compared at fp32 tolerances
    marker: str  # pytest marker selecting this backend's tests
    description: str
    # First-chunk modes it streams (its Backend class says the same; a test checks): the bounded-memory
    # matrix records the reference in the modes its candidates need before loading any of them.
    first_chunk_modes: tuple[str, ...] = ("plain", "pad-and-drop")

    def missing_requirements(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    def available(self) -> bool:
        return not self.missing_requirements()

    def _module(self):
        return importlib.import_module(self.module)

    def prepare(self, nemo_path: Path, work_dir: Path, *, dtype: str = "float32",
                att_context_sizes: Sequence[Sequence[int]] | None = None) -> Path:
        return self._module().prepare(Path(nemo_path), Path(work_dir), dtype=dtype,
                                      att_context_sizes=att_context_sizes)

    def load(self, source: Path, *, dtype: str | None = None, nemo_path: Path | None = None, **options: Any):
        """Open ``source``; without ``dtype`` the backend uses its default (MLX: the artifact's own)."""
        if dtype is not None:
            options["dtype"] = dtype
        return self._module().load(Path(source), nemo_path=nemo_path, **options)


REFERENCE = "nemo"

REGISTRY: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> None:
    if entry.name in REGISTRY:
        raise ValueError(f"backend {entry.name!r} registered twice")
    REGISTRY[entry.name] = entry


register(BackendEntry(
    name="nemo", module="backends.nemo", requires=("torch", "nemo"), dtypes=("float32",), marker="nemo",
    description="NeMo PyTorch (the reference): cache_aware_stream_step + NeMo greedy RNNT decoding"))

register(BackendEntry(
    name="onnx", module="backends.onnx", requires=("onnxruntime", "onnx"), dtypes=("float32", "int8"),
    marker="onnx", first_chunk_modes=("pad-and-drop",),
    description="ONNX Runtime over NeMo's cache-aware encoder + decoder_joint export (pad-and-drop graphs)"))

register(BackendEntry(
    name="mlx", module="backends.mlx", requires=("mlx",), dtypes=("float32", "bfloat16", "float16"), marker="mlx",
    description="MLX (our port): converted artifact, cache-aware streaming step, greedy RNNT decoding"))


def get(name: str) -> BackendEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; registered: {', '.join(REGISTRY)}") from None
