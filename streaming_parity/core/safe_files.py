"""Checking what a model file declares against the file itself, before anything is read or allocated.

A safetensors header, or an ONNX graph's pointer to its external weights, states how many bytes lie
where. A reader that believes it allocates that much: an MLX artifact whose header claimed one
tensor of 1 TiB made ``mx.load`` (and the fingerprint's hashing read) die with a ``MemoryError``.
Everything here is checked against the real file size, and a file that lies is refused with an
``UnsafeArtifact`` whose message is one line.

Imports nothing from the rest of the project but ``streaming_parity.core.errors``, so every layer and every
backend may use it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from streaming_parity.core.errors import InputNotFound, UnsafeArtifact

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
    # huggingface_hub's cache keeps a snapshot's files as links into the repository's blobs folder
    # (<repo>/snapshots/<commit>/<file> -> <repo>/blobs/<hash>): a target there is the repository's own.
    roots = [base, base.parent.parent / "blobs"] if base.parent.name == "snapshots" else [base]
    if not any(target.is_relative_to(root) for root in roots):
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


# Bytes per element of the ONNX tensor types whose external data can be checked against the shape
# (onnx.TensorProto.DataType names; strings and sub-byte types are not checked).
ONNX_ELEMENT_BYTES = {
    "FLOAT": 4, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "INT32": 4, "INT64": 8, "BOOL": 1,
    "FLOAT16": 2, "DOUBLE": 8, "UINT32": 4, "UINT64": 8, "COMPLEX64": 8, "COMPLEX128": 16, "BFLOAT16": 2,
    "FLOAT8E4M3FN": 1, "FLOAT8E4M3FNUZ": 1, "FLOAT8E5M2": 1, "FLOAT8E5M2FNUZ": 1,
}


def _onnx_graph_tensors(graph):
    """Every TensorProto of an ONNX graph: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield from (attribute.sparse_tensor.values, attribute.sparse_tensor.indices)
            for sparse in attribute.sparse_tensors:
                yield from (sparse.values, sparse.indices)
            if attribute.HasField("g"):
                yield from _onnx_graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _onnx_graph_tensors(subgraph)


def check_onnx_external_data(model, graph_path: str | Path) -> None:
    """Every tensor an ONNX graph stores outside its file must lie inside the graph's directory and within
    its data file, with the byte count its shape needs (``check_external_file``). ``model`` is the
    ``ModelProto`` loaded without external data. Needs the ``onnx`` package."""
    import onnx

    graph_path = Path(graph_path)
    for tensor in _onnx_graph_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        what = f"{graph_path}: tensor {tensor.name!r}"
        fields = {entry.key: entry.value for entry in tensor.external_data}
        try:
            offset = int(fields.get("offset") or 0)
            length = int(fields["length"]) if fields.get("length") else None
        except ValueError:
            raise UnsafeArtifact(f"{what}: external data offset {fields.get('offset')!r} or length "
                                 f"{fields.get('length')!r} is not an integer") from None
        _, span = check_external_file(graph_path.parent, fields.get("location", ""), offset, length, what=what)
        element = ONNX_ELEMENT_BYTES.get(onnx.TensorProto.DataType.Name(tensor.data_type))
        if element is not None and span != math.prod(tensor.dims) * element:
            raise UnsafeArtifact(f"{what}: external data of {span} bytes, its shape {list(tensor.dims)} needs "
                                 f"{math.prod(tensor.dims) * element}")


def load_onnx_graph(path: str | Path):
    """An ONNX graph's ``ModelProto`` without its external weights, after checking where they lie and their
    sizes (``check_onnx_external_data``). Needs the ``onnx`` package."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    _regular_file_size(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as error:
        raise UnsafeArtifact(f"{path}: not a readable ONNX graph ({error})") from None
    check_onnx_external_data(model, path)
    return model


MAX_TEXT_BYTES = 16 * 1024 * 1024  # a token table or a side file: a 1024-piece tokens.txt is about 10 kB


def read_text_file(path: str | Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file of an artifact (a token table, a JSON config), refused beyond ``limit`` bytes."""
    path = Path(path)
    size = _regular_file_size(path)
    if size > limit:
        raise UnsafeArtifact(f"{path}: {size} bytes, more than the {limit} a text file of a model may have")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UnsafeArtifact(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_token_table(path: str | Path, blank: str = "<blk>") -> list[str]:
    """A ``tokens.txt`` (``piece id`` per line, as sherpa-onnx writes it): ids from 0 each exactly once, the
    blank last. Returns the pieces without the blank, in id order; a duplicate or missing id, a line that
    is not ``piece id``, or a blank that is not the last id is refused with one line."""
    path = Path(path)
    pieces: dict[int, str] = {}
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.rsplit(" ", 1)
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise UnsafeArtifact(f"{path}: line {number} is not 'piece id': {line[:40]!r}")
        piece, index = fields[0], int(fields[1])
        if index in pieces:
            raise UnsafeArtifact(f"{path}: id {index} appears twice (for {pieces[index]!r} and {piece!r})")
        pieces[index] = piece
    if not pieces:
        raise UnsafeArtifact(f"{path}: no tokens")
    missing = [i for i in range(max(pieces) + 1) if i not in pieces]
    if missing:
        raise UnsafeArtifact(f"{path}: ids {missing[:5]} are missing (ids must run from 0 to {max(pieces)})")
    ordered = [pieces[i] for i in range(len(pieces))]
    if ordered[-1] != blank:
        raise UnsafeArtifact(f"{path}: the last id {len(ordered) - 1} is {ordered[-1]!r}, not the blank {blank!r}")
    return ordered[:-1]
