"""The recordings' shard format: lossless for every dtype and shape, smaller on activations, and refusing what
does not inflate to what it declares."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open
from safetensors.numpy import save_file

from streaming_parity.core.packed_tensors import (
    CODEC,
    DTYPES,
    METADATA_KEY,
    PackedReader,
    PackedTensorError,
    add_residual,
    prediction_residual,
    save_packed,
)

arrays = st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(
    np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)))


@settings(max_examples=60, deadline=None)
@given(tensors=st.dictionaries(st.text("abc/._0123", min_size=1, max_size=8), arrays, min_size=1, max_size=4))
def test_every_dtype_and_shape_reads_back_bit_for_bit(tmp_path_factory, tensors):
    path = tmp_path_factory.mktemp("packed") / "t.safetensors"
    save_packed(path, tensors)
    with PackedReader(path) as reader:
        assert set(reader.keys()) == set(tensors)
        for name, value in tensors.items():
            back = reader.get(name)
            assert back.dtype == value.dtype and back.shape == value.shape
            assert back.tobytes() == np.ascontiguousarray(value).tobytes()  # NaN payloads and -0.0 included


def _layout(path) -> dict:
    with safe_open(str(path), framework="numpy") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])


def test_activations_shrink_a_fresh_cache_to_almost_nothing_and_noise_is_stored_raw(tmp_path):
    rng = np.random.default_rng(0)
    # Activations of a layer: float32 of a few magnitudes, whose sign and exponent bytes repeat.
    activations = (rng.standard_normal((1, 64, 256)) * 0.5).astype(np.float32)
    tensors = {"layer": activations, "cache": np.zeros((4, 1, 70, 64), np.float32),
               "noise": rng.integers(0, 256, 4096, dtype=np.uint8)}
    save_packed(tmp_path / "t.safetensors", tensors)
    layout = _layout(tmp_path / "t.safetensors")
    assert layout["noise"][0] == "raw" and layout["layer"][0] == CODEC == layout["cache"][0]
    with safe_open(str(tmp_path / "t.safetensors"), framework="numpy") as handle:
        stored = {name: handle.get_tensor(name).nbytes for name in handle.keys()}
    assert stored["layer"] < 0.9 * activations.nbytes
    assert stored["cache"] < 0.01 * tensors["cache"].nbytes
    assert stored["noise"] == 4096


def test_a_plain_safetensors_file_is_read_as_it_is(tmp_path):
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({"x": value}, str(tmp_path / "plain.safetensors"))
    with PackedReader(tmp_path / "plain.safetensors") as reader:
        np.testing.assert_array_equal(reader.get("x"), value)


def _rewrite(path, stored: dict, layout: dict) -> None:
    save_file(stored, str(path), metadata={METADATA_KEY: json.dumps(layout)})


def _stored(path) -> dict:
    with safe_open(str(path), framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.mark.parametrize("tamper, message", [
    (lambda stored, layout: layout.__setitem__("x", [CODEC, "float32", [2, 4]]), "inflates past its declared float32 \\[2, 4\\]"),
    (lambda stored, layout: layout.__setitem__("x", [CODEC, "float32", [5, 4]]), "needs 80"),
    (lambda stored, layout: layout.__setitem__("x", [CODEC, "object", [3, 4]]), "declares dtype object"),
    (lambda stored, layout: layout.__setitem__("x", ["lz4", "float32", [3, 4]]), "unknown codec 'lz4'"),
    (lambda stored, layout: layout.__setitem__("x", [CODEC, "float32", [-1, 4]]), "declares dtype float32 and shape \\[-1, 4\\]"),
    (lambda stored, layout: stored.__setitem__("x", stored["x"][::-1].copy()), "corrupt compressed data"),
])
def test_a_tampered_tensor_is_refused_with_its_name(tmp_path, tamper, message):
    path = tmp_path / "t.safetensors"
    save_packed(path, {"x": np.zeros((3, 4), np.float32)})  # zeros: compressed, never raw
    stored, layout = _stored(path), _layout(path)
    assert layout["x"][0] == CODEC
    tamper(stored, layout)
    _rewrite(path, stored, layout)
    with PackedReader(path) as reader, pytest.raises(PackedTensorError, match=message):
        reader.get("x")


def test_metadata_that_does_not_describe_the_tensors_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save_packed(path, {"x": np.zeros(8, np.float32)})
    _rewrite(path, _stored(path), {"y": [CODEC, "float32", [8]]})
    with pytest.raises(PackedTensorError, match="does not describe exactly"):
        PackedReader(path)


def test_an_unpackable_dtype_is_refused_on_writing(tmp_path):
    with pytest.raises(PackedTensorError, match="x: dtype complex64 cannot be packed"):
        save_packed(tmp_path / "t.safetensors", {"x": np.zeros(3, np.complex64)})


# -- a tensor stored as its residual from a prediction ----------------------------------------------------------

BITS = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(sorted(BITS)), data=st.data())
def test_a_residual_gives_back_every_bit_pattern_whatever_the_prediction(dtype, data):
    """NaN payloads, infinities, -0.0 and subnormals, against any prediction, come back bit for bit."""
    unsigned = BITS[dtype]
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    bits = hnp.arrays(unsigned, shape, elements=st.integers(0, int(np.iinfo(unsigned).max)))
    value, prediction = data.draw(bits).view(dtype), data.draw(bits).view(dtype)
    residual = prediction_residual(value, prediction)
    assert residual.dtype == unsigned and residual.shape == value.shape
    back = add_residual(residual, prediction)
    assert back.dtype == value.dtype and back.tobytes() == value.tobytes()


def test_a_close_prediction_leaves_small_residuals_that_pack_small(tmp_path):
    """A value a few floats from its prediction (either side, across zero too) is a small integer."""
    rng = np.random.default_rng(1)
    prediction = rng.standard_normal((1, 64, 256)).astype(np.float32)
    value = prediction.copy()
    for _ in range(3):  # up to three floats away, up or down
        step = rng.integers(-1, 2, value.shape)
        value = np.where(step > 0, np.nextafter(value, np.float32(np.inf)),
                         np.where(step < 0, np.nextafter(value, np.float32(-np.inf)), value)).astype(np.float32)
    residual = prediction_residual(value, prediction)
    assert residual.max() <= 6  # zigzag: -3..3 -> 0..6
    assert prediction_residual(np.float32([-0.0, 1e-45]), np.float32([0.0, -1e-45])).tolist() == [1, 6]  # -1e-45, -0.0, 0.0, 1e-45
    save_packed(tmp_path / "r.safetensors", {"value": value, "residual": residual})
    with safe_open(str(tmp_path / "r.safetensors"), framework="numpy") as handle:
        assert handle.get_tensor("residual").nbytes < 0.15 * handle.get_tensor("value").nbytes  # ~3 bits of 32


def test_a_residual_and_a_prediction_that_do_not_fit_are_refused():
    with pytest.raises(PackedTensorError, match=r"float32 \[2\] against float64 \[2\]"):
        prediction_residual(np.zeros(2, np.float32), np.zeros(2, np.float64))
    with pytest.raises(PackedTensorError, match=r"residual uint32 \[3\] does not fit its prediction float32 \[2\]"):
        add_residual(np.zeros(3, np.uint32), np.zeros(2, np.float32))
    with pytest.raises(PackedTensorError, match="one float dtype"):
        prediction_residual(np.zeros(2, np.int32), np.zeros(2, np.int32))
