"""Checking what a model file declares against the file itself, before anything is read or allocated.

A safetensors header, or an ONNX graph's pointer to its external weights, states how many bytes lie
where. A reader that believes it allocates that much: an MLX artifact whose header claimed one
tensor of 1 TiB made ``mx.load`` (and the fingerprint's hashing read) die with a ``MemoryError``.
Everything here is checked against the real file size, and a file that lies is refused with an
``UnsafeArtifact`` whose message is one line.

Imports nothing from the rest of the project but ``harness.errors``, so every layer and every
backend may use it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from harness.errors import InputNotFound, UnsafeArtifact

# Bytes per element of every safetensors dtype this project can meet (the format's own names).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
# The safetensors library refuses larger headers too; a header is a few hundred bytes per tensor.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file: [start, end)
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, SafetensorsEntry]
    metadata: dict


def _regular_file_size(path: Path) -> int:
    if not path.exists():
        raise InputNotFound(f"{path}: no such file")
    if not path.is_file():
        raise UnsafeArtifact(f"{path}: not a regular file")
    return path.stat().st_size


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The header of a safetensors file, every declared size checked against the file's real size.

    Refused: a header length past the end of the file (or over ``MAX_SAFETENSORS_HEADER``), a header
    that is not a JSON object of tensors, an unknown dtype, a shape that is not a list of
    non-negative integers, ``data_offsets`` outside the data section, and a byte span that differs
    from what the dtype and shape need. Reads the header only.
    """
    path = Path(path)
    size = _regular_file_size(path)
    if size < 8:
        raise UnsafeArtifact(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise UnsafeArtifact(f"{path}: safetensors header length {header_len} exceeds the file "
                                 f"({size} bytes)")
        if header_len > MAX_SAFETENSORS_HEADER:
            raise UnsafeArtifact(f"{path}: safetensors header of {header_len} bytes exceeds the "
                                 f"{MAX_SAFETENSORS_HEADER} byte limit")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsafeArtifact(f"{path}: safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise UnsafeArtifact(f"{path}: safetensors header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise UnsafeArtifact(f"{path}: safetensors __metadata__ is not a JSON object")
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _entry(path, name, meta, data_start, data_size)
    return SafetensorsHeader(path, tensors, metadata)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, meta, data_start: int, data_size: int) -> SafetensorsEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise UnsafeArtifact(f"{where}: header entry is not a JSON object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise UnsafeArtifact(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise UnsafeArtifact(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise UnsafeArtifact(f"{where}: data_offsets {offsets!r} is not [start, end] with start <= end")
    start, end = offsets
    if end > data_size:
        raise UnsafeArtifact(f"{where}: data_offsets [{start}, {end}] end past the file's {data_size} data bytes")
    needed = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if end - start != needed:
        raise UnsafeArtifact(f"{where}: {dtype} {shape} needs {needed} bytes, data_offsets span {end - start}")
    return SafetensorsEntry(dtype, tuple(shape), data_start + start, data_start + end)


def check_external_file(directory: str | Path, location: str, offset: int, length: int | None, *,
                        what: str) -> tuple[Path, int]:
    """The file a model refers to for data it does not hold itself (ONNX external data), checked.

    ``location`` must be a relative path that stays inside ``directory``, symlinks resolved (no
    absolute path, no ``..``, no link pointing out), naming a regular file in which
    ``[offset, offset + length)`` lies (``length`` None: to the end of the file). Returns the
    resolved path and the number of bytes the span holds. ``what`` names the referring tensor in
    the message.
    """
    if not location:
        raise UnsafeArtifact(f"{what}: external data without a location")
    for flavour in (PurePosixPath, PureWindowsPath):
        pure = flavour(location)
        if pure.is_absolute() or pure.anchor:
            raise UnsafeArtifact(f"{what}: external data location {location!r} is an absolute path")
        if ".." in pure.parts:
            raise UnsafeArtifact(f"{what}: external data location {location!r} leaves the model's directory")
    base = Path(directory).resolve()
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise UnsafeArtifact(f"{what}: external data location {location!r} resolves to {target}, outside the "
                             f"model's directory {base}")
    if not target.is_file():
        raise UnsafeArtifact(f"{what}: external data file {location!r} does not exist or is not a regular file")
    size = target.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise UnsafeArtifact(f"{what}: negative external data offset {offset} or length {length}")
    end = size if length is None else offset + length
    if offset > size or end > size:
        raise UnsafeArtifact(f"{what}: external data [{offset}, {end}) lies past the end of {location!r} "
                             f"({size} bytes)")
    return target, end - offset
