"""Declared sizes are checked against the files before anything is read or allocated.

Each hostile file is crafted here: a safetensors header claiming a 1 TiB tensor or a header longer
than the file, an ONNX graph whose external weights lie outside its directory or past the end of
their file, a ``.nemo`` whose members lie about their size. Each is refused with one line of this
project's bad-input type, and ``parity fingerprint`` / ``parity verify`` exit 2 on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from streaming_parity.app.cli import EXIT_USAGE, main
from streaming_parity.core.errors import BadInput, UnsafeArtifact
from streaming_parity.core.safe_files import read_safetensors_header

TIB = 1 << 40


def one_line_cli_error(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    # Progress may log a line per phase before it (stderr is not a terminal here); the error is one line.
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert err.rstrip().endswith(errors[0].rstrip()), err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, errors[0]


# -- safetensors --------------------------------------------------------------------------------------

def write_safetensors(path: Path, header: dict, data: bytes, header_len: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def huge_tensor(path: Path) -> Path:
    """A header claiming one float32 tensor of 1 TiB, with 16 bytes of data behind it."""
    return write_safetensors(path, {"w": {"dtype": "F32", "shape": [TIB // 4], "data_offsets": [0, TIB]}},
                             b"\0" * 16)


def test_valid_safetensors_header_and_chunked_hashes(tmp_path):
    from safetensors.numpy import save_file

    from streaming_parity.interface.model_view import read_safetensors_index

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.float16),
              "empty": np.zeros((0, 3), dtype=np.float32)}
    path = tmp_path / "ok.safetensors"
    save_file(arrays, str(path), metadata={"format": "mlx"})
    header = read_safetensors_header(path)
    assert header.metadata == {"format": "mlx"}
    assert {n: (e.dtype, e.shape) for n, e in header.tensors.items()} == {
        "a": ("F32", (3, 4)), "b": ("F16", (5,)), "empty": ("F32", (0, 3))}
    raw = path.read_bytes()
    for name, array in arrays.items():
        entry = header.tensors[name]
        assert raw[entry.start:entry.end] == array.tobytes()
    index = read_safetensors_index(path, chunk=7)  # several chunks per tensor
    assert {n: i.sha256 for n, i in index.items()} == {
        n: hashlib.sha256(a.tobytes()).hexdigest() for n, a in arrays.items()}


@pytest.mark.parametrize(("label", "header", "data", "header_len", "fragment"), [
    ("1 TiB tensor", {"w": {"dtype": "F32", "shape": [TIB // 4], "data_offsets": [0, TIB]}}, b"\0" * 16, None,
     "data_offsets [0, 1099511627776] end past the file's 16 data bytes"),
    ("header longer than the file", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, TIB,
     "safetensors header length 1099511627776 exceeds the file"),
    ("span differs from dtype x shape", {"w": {"dtype": "F32", "shape": [TIB], "data_offsets": [0, 16]}}, b"\0" * 16,
     None, "F32 [1099511627776] needs 4398046511104 bytes, data_offsets span 16"),
    ("unknown dtype", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, None,
     "unknown dtype 'F128'"),
    ("negative dimension", {"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}, b"", None,
     "is not a list of non-negative integers"),
    ("offsets reversed", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8, None,
     "is not [start, end] with start <= end"),
    ("not an object", ["w"], b"", None, "is not a JSON object"),
])
def test_lying_safetensors_headers_are_refused(tmp_path, label, header, data, header_len, fragment):
    path = write_safetensors(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(UnsafeArtifact) as raised:
        read_safetensors_header(path)
    assert fragment in str(raised.value), label
    assert "\n" not in str(raised.value)


def test_truncated_and_non_json_safetensors(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(UnsafeArtifact, match="too short"):
        read_safetensors_header(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(UnsafeArtifact, match="not valid JSON"):
        read_safetensors_header(garbage)
    with pytest.raises(BadInput, match="no such file"):
        read_safetensors_header(tmp_path / "absent.safetensors")


def lying_mlx_artifact(directory: Path, *, record_dtype: bool = False) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    if record_dtype:  # artifact.json names the dtype, so nothing but the backend reads the header
        (directory / "artifact.json").write_text(json.dumps({"dtype": "float32"}))
    huge_tensor(directory / "model.safetensors")
    return directory


def test_fingerprint_and_verify_refuse_a_1_tib_header_with_exit_2(tmp_path, capsys):
    """Measured before: ``parity verify`` died with a MemoryError traceback and exit 1."""
    artifact = lying_mlx_artifact(tmp_path / "artifact")
    for command in ("fingerprint", "verify"):
        code, line = one_line_cli_error(capsys, command, artifact)
        assert code == EXIT_USAGE, command
        assert "model.safetensors: tensor 'w': data_offsets [0, 1099511627776] end past the file" in line


def test_mlx_artifact_readers_refuse_the_header_before_loading(tmp_path):
    from streaming_parity.backends.mlx.artifact import read_artifact_dtype, read_view

    artifact = lying_mlx_artifact(tmp_path / "artifact")
    with pytest.raises(UnsafeArtifact, match="end past the file"):
        read_artifact_dtype(artifact)
    with pytest.raises(UnsafeArtifact, match="end past the file"):
        read_view(artifact)


@pytest.mark.mlx
def test_mlx_backend_checks_the_header_before_mx_load(tmp_path, monkeypatch):
    pytest.importorskip("mlx.core")
    import streaming_parity.backends.mlx.backend as mlx_backend
    from streaming_parity.backends.mlx.artifact import iter_tensors

    def never(*args, **kwargs):
        raise AssertionError("mx.load was called on a refused file")

    monkeypatch.setattr(mlx_backend.mx, "load", never)
    artifact = lying_mlx_artifact(tmp_path / "artifact", record_dtype=True)
    with pytest.raises(UnsafeArtifact, match="end past the file"):
        mlx_backend.MLXBackend(artifact)
    with pytest.raises(UnsafeArtifact, match="end past the file"):
        list(iter_tensors(artifact))


# -- ONNX external data -----------------------------------------------------------------------------

def write_graph(directory: Path, location: str, *, offset: int = 0, length: int | None = 16, dims=(4,),
                name: str = "decoder_joint.onnx") -> Path:
    """A one-node graph whose single initializer lives in an external file at ``location``."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    weight.data_location = TensorProto.EXTERNAL
    fields = {"location": location, "offset": str(offset), **({"length": str(length)} if length is not None else {})}
    for key, value in fields.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))], initializer=[weight])
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    return path


def onnx_cases(tmp_path: Path) -> list[tuple[str, Path, str]]:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    cases = []

    def case(label: str, fragment: str, location: str, setup=None, **options):
        directory = tmp_path / label.replace(" ", "_")
        directory.mkdir()
        (directory / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
        if setup:
            setup(directory)
        write_graph(directory, location, **options)
        cases.append((label, directory, fragment))

    case("dot-dot", "external data location '../outside.bin' leaves the model's directory", "../outside.bin")
    case("absolute", "is an absolute path", str(outside))
    case("symlink out", "outside the model's directory", "link.bin",
         setup=lambda d: os.symlink(outside, d / "link.bin"))
    case("offset past the end", "external data [8, 24) lies past the end of 'weights.bin' (16 bytes)",
         "weights.bin", offset=8)
    case("1 TiB length", f"external data [0, {TIB}) lies past the end", "weights.bin", length=TIB, dims=(TIB // 4,))
    case("shape needs more", "external data of 16 bytes, its shape [1048576] needs 4194304", "weights.bin",
         dims=(1 << 20,))
    case("missing file", "external data file 'absent.bin' does not exist", "absent.bin")
    return cases


@pytest.mark.onnx
def test_onnx_external_data_is_checked_before_reading(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    from streaming_parity.backends.onnx.layout import read_view
    from streaming_parity.backends.onnx.runtime import OnnxBackend

    def never(*args, **kwargs):
        raise AssertionError("ONNX Runtime was handed a refused graph")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    for label, directory, fragment in onnx_cases(tmp_path):
        for read in (read_view, OnnxBackend):
            with pytest.raises(UnsafeArtifact) as raised:
                read(directory)
            assert fragment in str(raised.value), (label, str(raised.value))
            assert "\n" not in str(raised.value)
        code, line = one_line_cli_error(capsys, "fingerprint", directory)
        assert code == EXIT_USAGE and fragment in line, label


@pytest.mark.onnx
def test_honest_external_data_still_loads_and_runs(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from streaming_parity.backends.onnx.layout import read_view

    directory = tmp_path / "export"
    directory.mkdir()
    (directory / "weights.bin").write_bytes(b"\0" * 8 + np.arange(4, dtype=np.float32).tobytes())
    path = write_graph(directory, "weights.bin", offset=8, name="graph.onnx")
    view = read_view(directory)
    assert view.tensors["w"].shape == (4,)
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones(4, np.float32)})
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32) + 1)
    unbounded = write_graph(tmp_path / "no_length", "weights.bin", offset=0, length=None, name="graph.onnx")
    (unbounded.parent / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    assert read_view(unbounded.parent).tensors["w"].shape == (4,)


def test_a_file_that_is_not_onnx_is_refused(tmp_path, capsys):
    pytest.importorskip("onnx")
    directory = tmp_path / "export"
    directory.mkdir()
    (directory / "encoder-70_13.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\xff garbage")
    code, line = one_line_cli_error(capsys, "fingerprint", directory)
    assert code == EXIT_USAGE and "not a readable ONNX graph" in line


# -- .nemo members ------------------------------------------------------------------------------------

CONFIG = b"target: nemo.collections.asr.models.X\nencoder: {}\n"


def nemo_with(path: Path, members: list[tuple[str, bytes, int | None, bytes]]) -> Path:
    """A plain tar written header by header: ``(name, data, declared size or None, tar type)``."""
    with open(path, "wb") as handle:
        for name, data, declared, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if declared is None else declared
            handle.write(info.tobuf(tarfile.GNU_FORMAT))
            handle.write(data + b"\0" * (-len(data) % 512))
        handle.write(b"\0" * 1024)
    return path


def nemo_cases(tmp_path: Path) -> list[tuple[str, Path, str]]:
    regular = tarfile.REGTYPE
    return [
        ("weights declare 1 TiB", nemo_with(tmp_path / "weights.nemo", [
            ("model_config.yaml", CONFIG, None, regular), ("model_weights.ckpt", b"weights", TIB, regular)]),
         "truncated or corrupt: unexpected end of data"),
        ("config declares 1 TiB", nemo_with(tmp_path / "config.nemo", [
            ("model_config.yaml", CONFIG, TIB, regular), ("model_weights.ckpt", b"weights", None, regular)]),
         "truncated or corrupt: unexpected end of data"),  # the next header would lie past the end
        ("sparse config", nemo_with(tmp_path / "sparse.nemo", [
            ("model_config.yaml", b"", None, tarfile.GNUTYPE_SPARSE),
            ("model_weights.ckpt", b"weights", None, regular)]), "archive member 'model_config.yaml' is a sparse file"),
        ("empty weights", nemo_with(tmp_path / "empty.nemo", [
            ("model_config.yaml", CONFIG, None, regular), ("model_weights.ckpt", b"", None, regular)]),
         "model_weights.ckpt is empty"),
    ]


def test_nemo_members_that_lie_about_their_size_are_refused(tmp_path, capsys):
    from streaming_parity.core.nemo_file import UnsafeNemoFile, inspect_nemo

    for label, path, fragment in nemo_cases(tmp_path):
        with pytest.raises(UnsafeNemoFile) as raised:
            inspect_nemo(path)
        assert fragment in str(raised.value), (label, str(raised.value))
        code, line = one_line_cli_error(capsys, "fingerprint", path)
        assert code == EXIT_USAGE and fragment in line, label


def test_compressed_config_over_the_limit_is_refused_unread(tmp_path, monkeypatch):
    import streaming_parity.core.nemo_file as nemo_file

    path = tmp_path / "big.nemo"
    config = CONFIG + b"#" * 4000
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("model_config.yaml", config), ("model_weights.ckpt", b"weights")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert nemo_file.inspect_nemo(path).config["encoder"] == {}
    monkeypatch.setattr(nemo_file, "MAX_CONFIG_BYTES", 1000)

    def never(*args, **kwargs):
        raise AssertionError("a member was read before its declared size was checked")

    monkeypatch.setattr(tarfile.TarFile, "extractfile", never)  # a decompression bomb is never expanded
    with pytest.raises(nemo_file.UnsafeNemoFile, match=f"declares {len(config)} bytes, more than the 1000"):
        nemo_file.inspect_nemo(path)


def test_members_read_whole_have_a_size_limit(tmp_path):
    from streaming_parity.core.nemo_file import UnsafeNemoFile, inspect_nemo

    path = nemo_with(tmp_path / "tok.nemo", [("model_config.yaml", CONFIG, None, tarfile.REGTYPE),
                                             ("model_weights.ckpt", b"weights", None, tarfile.REGTYPE),
                                             ("tokenizer.model", b"x" * 2000, None, tarfile.REGTYPE)])
    archive = inspect_nemo(path)
    assert archive.read_member("tokenizer.model") == b"x" * 2000
    with pytest.raises(UnsafeNemoFile, match="'tokenizer.model' declares 2000 bytes, more than the 1000"):
        archive.read_member("tokenizer.model", limit=1000)


def test_a_hub_snapshot_link_into_its_own_blobs_is_accepted_and_one_elsewhere_is_not(tmp_path):
    """huggingface_hub's cache keeps a snapshot's files as links into the repository's blobs folder."""
    from streaming_parity.core.errors import UnsafeArtifact
    from streaming_parity.core.safe_files import check_external_file

    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "f00d").write_bytes(b"\0" * 64)
    (snapshot / "encoder.weights").symlink_to(repo / "blobs" / "f00d")
    assert check_external_file(snapshot, "encoder.weights", 0, 64, what="t")[1] == 64
    (tmp_path / "elsewhere.bin").write_bytes(b"\0" * 64)
    (snapshot / "other.weights").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(UnsafeArtifact, match="outside the model's directory"):
        check_external_file(snapshot, "other.weights", 0, 64, what="t")
