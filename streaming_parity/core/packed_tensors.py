"""Losslessly compressed tensors in a safetensors file: what a reference recording's shards are made of.

Activations and caches are float32 whose low mantissa bytes are close to random and whose sign and
exponent bytes repeat: grouping each byte position together (a byte shuffle, as Blosc and HDF5's shuffle
filter do) before zlib compresses the latter well, and the float32 tensors of a full-size recording to about
0.85 of their size (the zeros of a fresh cache to almost nothing). Each tensor is stored as a ``uint8``
tensor of its compressed bytes; the file's safetensors metadata holds the codec and each tensor's dtype and
shape, so the file stays a valid safetensors file and a reader needs only numpy, zlib and safetensors.

A tensor that compresses to no less than its size is stored as it is (codec ``raw`` for it). Reading checks
that the bytes inflate to exactly the declared dtype and shape, never more: the file is untrusted input.

Where a writer holds a close prediction of a float tensor (NeMo's offline forward and its streamed run agree to a
few units in the last place), ``prediction_residual`` turns the tensor into the difference of the two, counted in
representable floats: a few small integers whose high bytes are zero, which the shuffle and zlib store in a
fraction of the tensor's size. ``add_residual`` takes it back, bit for bit for every value (NaN payloads, -0.0 and
infinities included) whatever the prediction: the prediction decides the size, never the result.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from streaming_parity.core.errors import UnsafeArtifact

CODEC = "shuffle-zlib"
METADATA_KEY = "packed_tensors"
# What a packed file may declare: numpy dtypes the recordings hold (no object or structured dtypes).
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "bool")
ZLIB_LEVEL = 6  # level 1 is about twice as fast for 2 % more bytes; recording is streaming-bound anyway


class PackedTensorError(UnsafeArtifact):
    """A packed tensor that does not inflate to what its file declares."""


def _shuffled(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    if array.itemsize == 1:
        return array.tobytes()
    return array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()


def _unshuffled(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    planes = np.frombuffer(data, np.uint8)
    if dtype.itemsize > 1:
        planes = planes.reshape(dtype.itemsize, -1).T
    return np.ascontiguousarray(planes).view(dtype).reshape(shape)


# The unsigned integer of each float's width: a float's bits are read as one to take differences.
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_SIGNED = {2: np.int16, 4: np.int32, 8: np.int64}


def _ordered(bits: np.ndarray) -> np.ndarray:
    """Float bits as unsigned integers in the floats' order (negative floats reversed below the positive ones):
    neighbouring floats are neighbouring integers, across zero too."""
    sign = bits.dtype.type(1) << bits.dtype.type(8 * bits.itemsize - 1)
    return np.where(bits & sign, ~bits, bits | sign)


def _unordered(ordered: np.ndarray) -> np.ndarray:
    sign = ordered.dtype.type(1) << ordered.dtype.type(8 * ordered.itemsize - 1)
    return np.where(ordered & sign, ordered ^ sign, ~ordered)


def prediction_residual(value: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """``value`` as its distance from ``prediction`` in representable floats (zigzag-coded unsigned integers of the
    float's width): small where the prediction is close. ``add_residual(residual, prediction)`` returns ``value``."""
    value, prediction = np.asarray(value), np.asarray(prediction)
    if value.dtype != prediction.dtype or value.shape != prediction.shape or value.dtype.kind != "f" \
            or value.itemsize not in _UNSIGNED:
        raise PackedTensorError(f"a residual needs a value and a prediction of one float dtype and shape: "
                                f"{value.dtype} {list(value.shape)} against {prediction.dtype} {list(prediction.shape)}")
    unsigned, signed = _UNSIGNED[value.itemsize], _SIGNED[value.itemsize]
    difference = (_ordered(np.ascontiguousarray(value).view(unsigned))
                  - _ordered(np.ascontiguousarray(prediction).view(unsigned))).view(signed)  # wraps: every pair fits
    # Zigzag: -1, 1, -2, 2 ... become 1, 2, 3, 4 ..., so a small difference of either sign has zero high bytes.
    return ((difference << 1) ^ (difference >> (8 * value.itemsize - 1))).view(unsigned)


def add_residual(residual: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The tensor ``prediction_residual`` coded against ``prediction``, bit for bit."""
    residual, prediction = np.asarray(residual), np.asarray(prediction)
    if prediction.dtype.kind != "f" or prediction.itemsize not in _UNSIGNED \
            or residual.dtype != _UNSIGNED[prediction.itemsize] or residual.shape != prediction.shape:
        raise PackedTensorError(f"a residual {residual.dtype} {list(residual.shape)} does not fit its prediction "
                                f"{prediction.dtype} {list(prediction.shape)}")
    unsigned = residual.dtype.type
    difference = (residual >> unsigned(1)) ^ (unsigned(0) - (residual & unsigned(1)))
    ordered = _ordered(np.ascontiguousarray(prediction).view(residual.dtype)) + difference
    return _unordered(ordered).view(prediction.dtype)


def save_packed(path: str | Path, tensors: Mapping[str, np.ndarray], *, level: int = ZLIB_LEVEL) -> None:
    """Write ``tensors`` to ``path`` (safetensors), each byte-shuffled and zlib-compressed where that is smaller."""
    from safetensors.numpy import save_file

    stored: dict[str, np.ndarray] = {}
    layout: dict[str, list] = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.name not in DTYPES:
            raise PackedTensorError(f"{name}: dtype {value.dtype} cannot be packed (packable: {', '.join(DTYPES)})")
        packed = zlib.compress(_shuffled(value), level)
        if len(packed) < value.nbytes:
            stored[name], codec = np.frombuffer(packed, np.uint8), CODEC
        else:
            stored[name], codec = np.ascontiguousarray(value).reshape(-1).view(np.uint8), "raw"
        layout[name] = [codec, value.dtype.name, list(value.shape)]
    save_file(stored, str(path), metadata={METADATA_KEY: json.dumps(layout, separators=(",", ":"))})


class PackedReader:
    """Tensors of a packed file, inflated one by one on request (open for the ``with`` block)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._handle = safe_open(str(self.path), framework="numpy")
        metadata = self._handle.metadata() or {}
        if METADATA_KEY not in metadata:
            # A plain safetensors file (a recording of schema 1): its tensors are read as they are.
            self._layout = None
            return
        try:
            layout = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as error:
            raise PackedTensorError(f"{self.path}: unreadable {METADATA_KEY} metadata ({error})") from None
        if not isinstance(layout, dict) or set(layout) != set(self._handle.keys()):
            raise PackedTensorError(f"{self.path}: the metadata does not describe exactly the file's tensors")
        self._layout = layout

    def __enter__(self) -> PackedReader:
        return self

    def __exit__(self, *_exc) -> None:
        self._handle = None

    def keys(self) -> Iterator[str]:
        return iter(self._handle.keys())

    def get(self, name: str) -> np.ndarray:
        stored = self._handle.get_tensor(name)
        if self._layout is None:
            return stored
        try:
            codec, dtype_name, shape = self._layout[name]
            shape = tuple(int(n) for n in shape)
        except (KeyError, TypeError, ValueError):
            raise PackedTensorError(f"{self.path}: {name}: malformed layout {self._layout.get(name)!r}") from None
        if dtype_name not in DTYPES or any(n < 0 for n in shape):
            raise PackedTensorError(f"{self.path}: {name}: declares dtype {dtype_name} and shape {list(shape)}")
        dtype = np.dtype(dtype_name)
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if codec == "raw":
            data = stored.tobytes()
        elif codec == CODEC:
            inflater = zlib.decompressobj()
            try:
                # Never inflate past the declared size: the file is untrusted input.
                data = inflater.decompress(stored.tobytes(), expected)
            except zlib.error as error:
                raise PackedTensorError(f"{self.path}: {name}: corrupt compressed data ({error})") from None
            if not inflater.eof or inflater.unconsumed_tail:
                raise PackedTensorError(f"{self.path}: {name}: inflates past its declared {dtype_name} "
                                        f"{list(shape)} ({expected} bytes)")
        else:
            raise PackedTensorError(f"{self.path}: {name}: unknown codec {codec!r} (known: {CODEC}, raw)")
        if len(data) != expected:
            raise PackedTensorError(f"{self.path}: {name}: {len(data)} bytes, the declared {dtype_name} {list(shape)} "
                                    f"needs {expected}")
        if codec == "raw":
            return np.frombuffer(data, dtype).reshape(shape).copy()
        return _unshuffled(data, dtype, shape)
