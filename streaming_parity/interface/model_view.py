"""How an artifact looks to the layers that inspect it: its tensors (shapes, dtypes, hashes) and its config.

Every backend that has an artifact format reads its files into a ``ModelView`` (the registry's
``reader``); detection (``streaming_parity.detect``) fingerprints and diagnoses views without knowing
any format. The helpers here are what those readers share: hashing a tensor, listing a SentencePiece
model's pieces, indexing a safetensors file without loading it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streaming_parity.core.errors import UnsafeArtifact
from streaming_parity.core.safe_files import read_safetensors_header


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    sha256: str


@dataclass
class ModelView:
    """A model's tensors (shapes and hashes) and config claims, whatever format it came in."""

    kind: str  # "nemo", "mlx", "onnx"
    path: Path
    layout: str  # "pytorch" (OIHW / OIK, LSTM weight_ih_lN) or "mlx" (OHWI / OKI, lstm.N.Wx)
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    vocabulary: list[str] | None = None
    tokenizer_pieces: list[str] | None = None
    notes: list[str] = field(default_factory=list)



def tensor_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def tokenizer_pieces(model_bytes: bytes) -> list[str]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def read_safetensors_index(path: Path, chunk: int = 1 << 22) -> dict[str, TensorInfo]:
    """Shapes, dtypes and raw-byte hashes of a safetensors file, without converting any dtype.

    The header is checked against the file first (``streaming_parity.core.safe_files``: a header that declares more
    than the file holds is refused), and each tensor is hashed in chunks, never read whole.
    """
    header = read_safetensors_header(path)
    tensors = {}
    with open(path, "rb") as handle:
        for name, entry in header.tensors.items():
            handle.seek(entry.start)
            digest = hashlib.sha256()
            remaining = entry.end - entry.start
            while remaining:
                block = handle.read(min(chunk, remaining))
                if not block:  # the file shrank after its header was checked
                    raise UnsafeArtifact(f"{path}: tensor {name!r} ends past the end of the file")
                digest.update(block)
                remaining -= len(block)
            tensors[name] = TensorInfo(entry.shape, entry.dtype, digest.hexdigest())
    return tensors


ArtifactReader = Callable[[Path], "ModelView | None"]
