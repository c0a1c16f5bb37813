"""The MLX artifact: its files, how they are read, and the dtype they hold.

The backend (``backend.py``), the converter (``convert.py``), verification (``verify.py``), the
mutation catalog and ``parity fingerprint`` all read an artifact through this module, so none of
them imports another to learn a file name.

Layout (``DIR``)::

    model.safetensors     weights in MLX layout (the mapping in streaming_parity/backends/mlx/mapping.py), chosen dtype
    frontend.safetensors  the checkpoint's own window and mel filterbank, float32
    config.json           the NeMo model config, copied faithfully, vocabulary as joint.vocabulary
    tokenizer.model       the SentencePiece model from the .nemo
    artifact.json         what was written: dtype, source sha256, file and per-tensor sha256, provenance
    parity.json           the NeMo-vs-MLX verification that allowed publication
    README.md             the hub model card (``parity convert --model-card``), when written
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from streaming_parity.core.errors import InputNotFound, UnsafeArtifact
from streaming_parity.core.safe_files import read_safetensors_header
from streaming_parity.core.system.provenance import Provenance

MODEL_FILE = "model.safetensors"  # the weights parakeet-mlx also loads
FRONTEND_FILE = "frontend.safetensors"  # the checkpoint's own window and mel filterbank (always float32)
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
ARTIFACT_FILE = "artifact.json"
PARITY_FILE = "parity.json"
MODEL_CARD_FILE = "README.md"
ARTIFACT_FORMAT = "streaming-parity-mlx/1"
DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def is_artifact(directory: Path) -> bool:
    return Path(directory).is_dir() and (Path(directory) / MODEL_FILE).exists()


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def read_artifact_dtype(directory: Path) -> str:
    """The dtype an artifact was written in (artifact.json, else the safetensors header)."""
    record = directory / ARTIFACT_FILE
    if record.exists():
        return json.loads(record.read_text())["dtype"]
    header = read_safetensors_header(directory / MODEL_FILE)
    names = {entry.dtype for entry in header.tensors.values()}
    reverse = {v: k for k, v in SAFETENSORS_DTYPE.items()}
    if len(names) != 1 or next(iter(names)) not in reverse:
        raise UnsafeArtifact(f"{directory / MODEL_FILE}: mixed or unknown dtypes {sorted(names)}")
    return reverse[names.pop()]


def recorded_provenance(directory: Path) -> Provenance | None:
    """What ``artifact.json`` says the artifact was converted from (``Provenance.from_manifest``)."""
    return Provenance.from_manifest(Path(directory) / ARTIFACT_FILE)


def iter_tensors(directory: Path, file: str = MODEL_FILE) -> Iterable[tuple[str, np.ndarray]]:
    """The tensors of an artifact file as float32 numpy arrays (for the round-trip test and tools)."""
    import mlx.core as mx

    path = Path(directory) / file
    read_safetensors_header(path)  # mx.load allocates what the header declares: check it against the file
    for name, value in mx.load(str(path)).items():
        yield name, np.array(value.astype(mx.float32))


def read_view(path: Path):
    """``parity fingerprint``'s view of an artifact (None when ``path`` is not one)."""
    from streaming_parity.core.nemo_config import stated_config
    from streaming_parity.interface.model_view import ModelView, read_safetensors_index, tokenizer_pieces

    directory = Path(path)
    if not is_artifact(directory):
        return None
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise InputNotFound(f"{directory}: not an MLX artifact (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text())
    vocabulary = stated_config(config).joint.get("vocabulary")
    tokenizer = directory / TOKENIZER_FILE
    pieces = tokenizer_pieces(tokenizer.read_bytes()) if tokenizer.exists() else None
    return ModelView("mlx", directory, "mlx", read_safetensors_index(directory / MODEL_FILE), config,
                     vocabulary=None if vocabulary is None else list(vocabulary), tokenizer_pieces=pieces)
