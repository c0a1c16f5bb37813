"""Files other exporters write (sherpa-onnx, NeMo's plain export, parakeet-rs), read without this project's
metadata and driven by the harness's ONNX Runtime driver, against NeMo on tiny-streaming.

Each directory is built offline by ``streaming_parity.backends.onnx.peer_export`` (two lookaheads, one subdirectory each);
NeMo's pad-and-drop runs are shared with the parity suites (``run_cache``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import copy_dir
from graph_metadata import set_metadata

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from streaming_parity.backends.onnx.foreign_detect import (  # noqa: E402
    FOREIGN_FORMATS,
    NEMO_EXPORT,
    PARAKEET_RS,
    SHERPA_ONNX,
    detect,
)
from streaming_parity.backends.onnx.foreign_read import ArtifactContradiction  # noqa: E402
from streaming_parity.backends.onnx.foreign_run import ForeignOnnxBackend  # noqa: E402
from streaming_parity.backends.onnx.peer_export import PEER_FORMATS, SHERPA_SCRIPTS  # noqa: E402
from streaming_parity.core.errors import UnsafeArtifact  # noqa: E402
from streaming_parity.interface.chunking import FirstChunkMode  # noqa: E402
from streaming_parity.interface.driver import stream  # noqa: E402
from streaming_parity.judge.compare import compare_runs  # noqa: E402

pytestmark = pytest.mark.onnx

PAD = FirstChunkMode.PAD_AND_DROP
CONTEXTS = [(70, 13), (70, 1)]
DETECTED = {"sherpa-onnx": SHERPA_ONNX, "nemo": NEMO_EXPORT, "parakeet-rs": PARAKEET_RS}


@pytest.fixture(scope="session")
def peer_dirs(tiny_nemo, work_dir) -> dict[str, Path]:
    from streaming_parity.backends.onnx.peer_export import export_peer_cached

    return {fmt: export_peer_cached(tiny_nemo, work_dir / "peers", fmt=fmt, att_context_sizes=CONTEXTS)
            for fmt in PEER_FORMATS}


@pytest.fixture(scope="session")
def two_utterances(utterances):
    return sorted(utterances, key=lambda u: len(u.audio))[:2]


def _lookahead(peer_dirs, fmt: str, context=(70, 13)) -> Path:
    """One lookahead's subdirectory, copied (so a test may change it)."""
    from streaming_parity.backends.onnx.peer_export import lookahead_dir

    return lookahead_dir(peer_dirs[fmt], fmt, context, 8, several=True)


# -- detection ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", PEER_FORMATS)
def test_each_format_is_detected_from_file_names(peer_dirs, fmt):
    from streaming_parity.app.peers import detect_backend, parse_candidate

    assert detect(peer_dirs[fmt]) == DETECTED[fmt]
    assert detect(_lookahead(peer_dirs, fmt)) == DETECTED[fmt]
    assert detect_backend(peer_dirs[fmt]) == ("onnx", DETECTED[fmt])
    assert parse_candidate(f"onnx:int8:{peer_dirs[fmt]}") == ("onnx", "int8", peer_dirs[fmt])
    assert parse_candidate(str(peer_dirs[fmt])) == (None, None, peer_dirs[fmt])


def test_own_export_and_unknown_directories(backend_pool, tmp_path):
    assert detect(backend_pool.source("onnx")) == "parity"
    assert detect(tmp_path) is None
    from streaming_parity.app.peers import detect_backend
    from streaming_parity.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="no backend recognises it"):
        detect_backend(tmp_path)


# -- parity through the harness's driver -------------------------------------------------------------

@pytest.mark.parametrize("fmt", PEER_FORMATS)
def test_foreign_directory_matches_nemo_tap_by_tap(fmt, peer_dirs, tiny_nemo, run_cache, two_utterances, tolerances):
    """Every lookahead found by probing the graphs, every tap found by graph surgery, fp32 tolerances."""
    backend = ForeignOnnxBackend(peer_dirs[fmt], nemo_path=tiny_nemo)
    try:
        assert backend.format == DETECTED[fmt]
        assert set(backend.info.att_context_sizes) == set(CONTEXTS)
        assert backend.notes()[-1] == "taps unavailable: none"
        expected_layout = "layers-first" if fmt == "parakeet-rs" else "batch-first"
        assert backend.cache_layout == expected_layout
        num_layers = backend.info.num_layers
        every_tap = {"mel", "pre_encode", *(f"layers.{i}" for i in range(num_layers)), "encoder", "decoder",
                     "joint", "cache_last_channel", "cache_last_time", "cache_last_channel_len"}
        for utterance in two_utterances:
            features = backend.features(utterance.audio[None])[0]
            for context in CONTEXTS:
                reference = run_cache.run("nemo", utterance, context, PAD)
                candidate = stream(backend, run_cache.mel(utterance), context, PAD, features=features)
                comparison = compare_runs(reference, candidate, tolerances, num_layers=num_layers,
                                          utterance=utterance.name)
                assert every_tap <= {t.tap for t in comparison.taps}, sorted(every_tap - {t.tap for t in comparison.taps})
                assert comparison.passed, comparison.describe_failure()
                assert comparison.tokens_equal
    finally:
        backend.close()


def test_graph_without_layer_scopes_still_compares_what_it_has(peer_dirs, tiny_nemo, run_cache, two_utterances,
                                                                tolerances, tmp_path):
    """A layer whose node names carry no module scope: that tap is reported unavailable, the rest compared."""
    directory = copy_dir(_lookahead(peer_dirs, "nemo"), tmp_path / "renamed")
    graph_path = directory / "encoder-model.onnx"
    model = onnx.load(str(graph_path))
    for node in model.graph.node:
        node.name = node.name.replace("/layers.1/", "/anonymous/")
    onnx.save(model, str(graph_path))
    backend = ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    try:
        assert "layers.1" in backend.unavailable_taps and "layers.0" not in backend.unavailable_taps
        assert "layers.1 (tap 'layers.1': no node in module scope" in backend.notes()[-1]
        utterance = two_utterances[0]
        reference = run_cache.run("nemo", utterance, (70, 13), PAD)
        candidate = stream(backend, run_cache.mel(utterance), (70, 13), PAD)
        comparison = compare_runs(reference, candidate, tolerances, num_layers=backend.info.num_layers)
        taps = {t.tap for t in comparison.taps}
        assert "layers.1" not in taps and {"layers.0", "layers.2", "encoder", "joint", "decoder"} <= taps
        assert comparison.passed, comparison.describe_failure()
    finally:
        backend.close()


# -- contradictions with the .nemo: one line naming the key and both values ---------------------------

@pytest.mark.parametrize(("key", "value", "stated"), [
    ("cache_last_channel_dim2", 56, "cache_last_channel_dim2 (left context) = 56 contradicts the .nemo's "
                                    "encoder.att_context_size left = 70"),
    ("cache_last_channel_dim1", 24, "cache_last_channel_dim1 = 24 contradicts the .nemo's encoder.n_layers = 3"),
    ("cache_last_time_dim3", 4, "cache_last_time_dim3 = 4 contradicts the .nemo's encoder.conv_kernel_size - 1 = 8"),
    ("window_size", 112, "window_size = 112 contradicts the .nemo's chunk_size + pre_encode_cache_size at [70, 13] "
                         "= 121"),
    ("chunk_shift", 121, "chunk_shift = 121 contradicts the .nemo's chunk_size at [70, 13] = 112"),
    ("normalize_type", "per_feature", "normalize_type = 'per_feature' contradicts the .nemo's "
                                      "preprocessor.normalize = 'NA'"),
    ("feat_dim", 80, "feat_dim = 80 contradicts the .nemo's encoder.feat_in = 128"),
    ("vocab_size", 1024, "vocab_size = 1024 contradicts the .nemo's vocabulary size = 128"),
    ("subsampling_factor", 4, "subsampling_factor = 4 contradicts the .nemo's encoder.subsampling_factor = 8"),
])
def test_sherpa_metadata_that_lies_is_refused(peer_dirs, tiny_nemo, tmp_path, key, value, stated):
    directory = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "lying")
    set_metadata(directory / "encoder.onnx", **{key: value})
    with pytest.raises(ArtifactContradiction) as caught:
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    message = str(caught.value)
    assert "\n" not in message and stated in message


def test_parakeet_config_and_tokens_that_lie_are_refused(peer_dirs, tiny_nemo, tmp_path):
    directory = copy_dir(_lookahead(peer_dirs, "parakeet-rs"), tmp_path / "parakeet")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["preprocessor"]["normalize"] = "per_feature"  # what parakeet-rs' exporter hard-codes
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactContradiction, match="preprocessor.normalize = 'per_feature' contradicts the "
                                                    "\\.nemo's preprocessor.normalize = 'NA'"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    config["preprocessor"]["normalize"] = "NA"
    config["att_context_size"] = [70, 6]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactContradiction, match=r"att_context_size = \[70, 6\] contradicts the \.nemo's the "
                                                    r"encoder graph \(probed\) = \[70, 13\]"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)

    sherpa = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "tokens")
    lines = (sherpa / "tokens.txt").read_text(encoding="utf-8").splitlines()
    lines[5] = f"▁lie {lines[5].rsplit(' ', 1)[1]}"
    (sherpa / "tokens.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ArtifactContradiction, match="tokens.txt: id 5 = '▁lie' contradicts the .nemo's tokenizer "
                                                    "piece 5"):
        ForeignOnnxBackend(sherpa, nemo_path=tiny_nemo)


def test_foreign_directory_needs_its_nemo(peer_dirs):
    from streaming_parity.backends.onnx.foreign_read import ForeignArtifactError

    with pytest.raises(ForeignArtifactError, match="read against the .nemo they were exported from"):
        ForeignOnnxBackend(peer_dirs["nemo"])


# -- untrusted files -----------------------------------------------------------------------------------

def test_external_data_outside_the_directory_is_refused(peer_dirs, tiny_nemo, tmp_path):
    directory = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "escape" / "inner")
    shutil.move(directory / "encoder.data", tmp_path / "escape" / "encoder.data")
    model = onnx.load(str(directory / "encoder.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../encoder.data"
    onnx.save(model, str(directory / "encoder.onnx"))
    with pytest.raises(UnsafeArtifact, match="'../encoder.data' leaves the model's directory"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)


def test_declared_tensor_larger_than_its_file_is_refused(peer_dirs, tiny_nemo, tmp_path):
    directory = copy_dir(_lookahead(peer_dirs, "parakeet-rs"), tmp_path / "truncated")
    data = directory / "encoder.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(UnsafeArtifact, match="lies past the end of 'encoder.onnx.data'"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)


@pytest.mark.parametrize(("edit", "error"), [
    (lambda lines: lines[:3] + [lines[3].rsplit(" ", 1)[0] + " 2"] + lines[4:], "id 2 appears twice"),
    (lambda lines: lines[:3] + lines[4:], r"ids \[3\] are missing"),
    (lambda lines: lines[:-1], "is '.*', not the blank '<blk>'"),
])
def test_token_tables_with_duplicate_or_missing_ids_are_refused(peer_dirs, tiny_nemo, tmp_path, edit, error):
    directory = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "tokens")
    path = directory / "tokens.txt"
    path.write_text("\n".join(edit(path.read_text(encoding="utf-8").splitlines())) + "\n", encoding="utf-8")
    with pytest.raises(UnsafeArtifact, match=error):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)


def test_writers_output_the_peers_own_interfaces(peer_dirs):
    """What each peer's runtime reads, checked on the written files (names, layouts, metadata)."""
    from streaming_parity.backends.onnx.foreign_read import GraphIO

    sherpa = _lookahead(peer_dirs, "sherpa-onnx")
    encoder = GraphIO.read(sherpa / "encoder.onnx")
    assert list(encoder.inputs) == ["audio_signal", "length", "cache_last_channel", "cache_last_time",
                                    "cache_last_channel_len"]
    assert {k: encoder.metadata[k] for k in ("window_size", "chunk_shift", "chunk_size_ms", "normalize_type",
                                             "cache_last_channel_dim2", "vocab_size")} == {
        "window_size": "121", "chunk_shift": "112", "chunk_size_ms": "1120", "normalize_type": "",
        "cache_last_channel_dim2": "70", "vocab_size": "128"}
    tokens = (sherpa / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert tokens[-1] == "<blk> 128" and len(tokens) == 129
    assert (sherpa / "encoder.data").is_file()  # sherpa-onnx's script saves the encoder's weights outside
    parakeet = GraphIO.read(_lookahead(peer_dirs, "parakeet-rs") / "encoder.onnx")
    assert list(parakeet.outputs)[:2] == ["encoded", "encoded_len"]
    assert parakeet.inputs["cache_last_channel"] == (3, 1, 70, 64)  # layers-first, static
    assert parakeet.metadata["chunk_size_output_frames"] == "14"
    nemo = _lookahead(peer_dirs, "nemo")
    assert sorted(p.name for p in nemo.glob("*.onnx")) == ["decoder_joint-model.onnx", "encoder-model.onnx"]
    assert FOREIGN_FORMATS == (SHERPA_ONNX, NEMO_EXPORT, PARAKEET_RS)
    assert np.isfinite(float(len(tokens)))


def test_multitalker_graphs_in_parakeet_rs_naming(multitalker_nemo, tmp_path):
    """parakeet-rs' multitalker naming (spk_targets, bg_spk_targets; batch-first caches) without any
    metadata of ours: the same outputs as this project's runtime on the same graphs, every tap found."""
    from streaming_parity.app.session import fixture_utterances
    from streaming_parity.backends.onnx.export import export_onnx
    from streaming_parity.backends.onnx.runtime import OnnxBackend
    from streaming_parity.interface.speakers import SpeakerTargets

    own = tmp_path / "own"
    export_onnx(multitalker_nemo, own, att_context_sizes=[(70, 13)])
    bare = tmp_path / "parakeet-rs"
    bare.mkdir()
    shutil.copy(own / "encoder-70_13.onnx", bare / "encoder.onnx")
    shutil.copy(own / "decoder_joint.onnx", bare / "decoder_joint.onnx")
    for data in own.iterdir():
        if not data.name.endswith((".onnx", ".json", ".npz", ".txt", ".model")):
            shutil.copy(data, bare / data.name)  # external weights, where the graphs name them
    assert detect(bare) == PARAKEET_RS
    ours, foreign = OnnxBackend(own), ForeignOnnxBackend(bare, nemo_path=multitalker_nemo)
    try:
        assert foreign.cache_layout == "batch-first" and foreign.interface.speaker_masks
        assert foreign.notes()[-1] == "taps unavailable: none"
        utterance = fixture_utterances()[1]
        mel = ours.features(utterance.audio[None])[0]
        masks = SpeakerTargets.turns(utterance.encoder_frames)
        a = stream(ours, mel, (70, 13), PAD, speaker_masks=masks)
        b = stream(foreign, mel, (70, 13), PAD, speaker_masks=masks)
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.encoded, b.encoded)
        assert {"pre_encode", "layers.0", "layers.2", "decoder", "joint"} <= set(b.steps[0].taps)
    finally:
        ours.close()
        foreign.close()


# -- every version of sherpa-onnx's export script ------------------------------------------------------

# The encoder metadata each version writes, in its order (k2-fsa/sherpa-onnx: the FastConformer script
# scripts/nemo/fast-conformer-hybrid-transducer-ctc/export-onnx-transducer.py, the Nemotron script
# scripts/nemo/nemotron-speech-streaming-en-0.6b/export_onnx.py, at the commits SHERPA_SCRIPTS names).
_FAST_CONFORMER_KEYS = ["vocab_size", "window_size", "chunk_shift", "normalize_type", "cache_last_channel_dim1",
                        "cache_last_channel_dim2", "cache_last_channel_dim3", "cache_last_time_dim1",
                        "cache_last_time_dim2", "cache_last_time_dim3", "pred_rnn_layers", "pred_hidden",
                        "subsampling_factor", "model_type", "version", "model_author", "url", "comment"]
_WITH_FEAT_DIM = [*_FAST_CONFORMER_KEYS[:13], "feat_dim", *_FAST_CONFORMER_KEYS[13:]]
SCRIPT_METADATA = {
    # name: (keys, normalize_type for a model whose normalize is "NA", weights in encoder.data, int8 copies)
    "fast-conformer-2024-05": (_FAST_CONFORMER_KEYS, "None", False, False),
    "fast-conformer": (_FAST_CONFORMER_KEYS, "", False, True),
    "nemotron-2026-01": (_WITH_FEAT_DIM, "", True, True),
    "nemotron": ([*_WITH_FEAT_DIM[:2], "chunk_size_ms", *_WITH_FEAT_DIM[2:]], "", True, True),
}
OLDER = ("fast-conformer-2024-05", "fast-conformer")


@pytest.fixture(scope="session")
def script_dirs(tiny_nemo, work_dir) -> dict[str, Path]:
    """[70,13] written by each version of sherpa-onnx's script (with its int8 copies where it writes them)."""
    from streaming_parity.backends.onnx.peer_export import export_peer_cached

    return {name: export_peer_cached(tiny_nemo, work_dir / "scripts", fmt="sherpa-onnx", att_context_sizes=[(70, 13)],
                                     int8=script.int8, script=name)
            for name, script in SHERPA_SCRIPTS.items()}


def test_every_script_version_is_described():
    assert set(SCRIPT_METADATA) == set(SHERPA_SCRIPTS)


@pytest.mark.parametrize("name", list(SCRIPT_METADATA))
def test_each_script_version_writes_its_metadata_and_loads(script_dirs, tiny_nemo, name):
    """What each version writes (keys, the spelling of "no normalisation", where the weights go) is read
    back without a complaint, at the lookahead the graph runs."""
    from streaming_parity.backends.onnx.foreign_read import GraphIO

    keys, normalize, encoder_data, int8 = SCRIPT_METADATA[name]
    directory = script_dirs[name]
    encoder = GraphIO.read(directory / "encoder.onnx")
    assert list(encoder.metadata) == keys
    assert encoder.metadata["normalize_type"] == normalize
    assert (directory / "encoder.data").is_file() == encoder_data
    assert (directory / "encoder.int8.onnx").is_file() == int8
    if int8:
        assert GraphIO.read(directory / "encoder.int8.onnx").metadata["window_size"] == "121"
    assert detect(directory) == SHERPA_ONNX
    backend = ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    try:
        assert backend.artifact.contexts == ((70, 13),)
        assert sorted(backend.artifact.lookaheads[(70, 13)].encoder) == (["float32", "int8"] if int8 else ["float32"])
    finally:
        backend.close()


@pytest.mark.parametrize("name", OLDER)
def test_older_script_directory_matches_nemo_and_a_corrupted_graph_is_caught(
        name, script_dirs, tiny_nemo, run_cache, two_utterances, tolerances, tmp_path):
    """The FastConformer script writes neither chunk_size_ms nor feat_dim (its first version "None" for
    normalize_type): the directory passes fp32 parity tap by tap; the same directory with one weight of
    layers.1 scaled fails at layers.1, and with a cache shape that contradicts the .nemo is refused."""
    directory = script_dirs[name]
    metadata = onnx.load(str(directory / "encoder.onnx"), load_external_data=False).metadata_props
    assert not {"chunk_size_ms", "feat_dim"} & {p.key for p in metadata}
    backend = ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    try:
        assert backend.notes()[-1] == "taps unavailable: none"
        num_layers = backend.info.num_layers
        for utterance in two_utterances:
            reference = run_cache.run("nemo", utterance, (70, 13), PAD)
            candidate = stream(backend, run_cache.mel(utterance), (70, 13), PAD)
            comparison = compare_runs(reference, candidate, tolerances, num_layers=num_layers,
                                      utterance=utterance.name)
            assert {"pre_encode", "layers.0", "encoder", "decoder", "joint"} <= {t.tap for t in comparison.taps}
            assert comparison.passed, comparison.describe_failure()
            assert comparison.tokens_equal
    finally:
        backend.close()

    corrupted = copy_dir(directory, tmp_path / "corrupted")
    graph = onnx.load(str(corrupted / "encoder.onnx"))
    weight = next(t for t in graph.graph.initializer if t.name == "layers.1.conv.pointwise_conv1.weight")
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * 1.1, weight.name))
    onnx.save(graph, str(corrupted / "encoder.onnx"))
    backend = ForeignOnnxBackend(corrupted, nemo_path=tiny_nemo)
    try:
        utterance = two_utterances[0]
        reference = run_cache.run("nemo", utterance, (70, 13), PAD)
        candidate = stream(backend, run_cache.mel(utterance), (70, 13), PAD)
        comparison = compare_runs(reference, candidate, tolerances, num_layers=backend.info.num_layers)
        assert not comparison.passed
        assert comparison.first_divergence().tap == "layers.1", comparison.describe_failure()
    finally:
        backend.close()

    reshaped = copy_dir(directory, tmp_path / "reshaped")
    graph = onnx.load(str(reshaped / "encoder.onnx"))
    channel = next(i for i in graph.graph.input if i.name == "cache_last_channel")
    channel.type.tensor_type.shape.dim[1].dim_value = 4
    onnx.save(graph, str(reshaped / "encoder.onnx"))
    with pytest.raises(ArtifactContradiction, match=r"encoder\.onnx: cache_last_channel layers \(axis 1\) = 4 "
                                                    r"contradicts the \.nemo's encoder\.n_layers = 3"):
        ForeignOnnxBackend(reshaped, nemo_path=tiny_nemo)


def test_int8_directory_as_the_run_scripts_leave_it(script_dirs, tiny_nemo, tmp_path):
    """run-transducer.sh (and the Nemotron release workflow) move the int8 copies into a directory of their
    own with tokens.txt: it is recognised, runs as int8, and names what it holds when float32 is asked for.
    Each variant's encoder is checked: a lying int8 encoder beside a sound float32 one is refused."""
    from streaming_parity.backends.onnx.layout import MissingGraphError

    source = script_dirs["fast-conformer"]
    int8 = tmp_path / "sherpa-onnx-int8"
    int8.mkdir()
    for name in ("encoder.int8.onnx", "decoder.int8.onnx", "joiner.int8.onnx", "tokens.txt"):
        shutil.copy(source / name, int8 / name)
    assert detect(int8) == SHERPA_ONNX
    backend = ForeignOnnxBackend(int8, dtype="int8", nemo_path=tiny_nemo)
    try:
        assert backend.artifact.contexts == ((70, 13),)
        assert sorted(backend.artifact.lookaheads[(70, 13)].encoder) == ["int8"]
        # The script's QUInt8 reaches MatMul and Gather only: ONNX Runtime's LSTM quantizer writes the prediction
        # net's weights as full-range s8 whatever weight_type says, the kind that saturates without VNNI.
        scheme = backend.int8_quantization()
        assert (scheme.weight_type, scheme.weight_bits, scheme.read_from) == ("QInt8", 8, "decoder.int8.onnx"), scheme
        assert scheme.saturation_prone and any("int8: QInt8 weights" in line for line in backend.notes())
    finally:
        backend.close()
    with pytest.raises(MissingGraphError, match=r"no float32 decoder graph \(sherpa-onnx directory with int8 "
                                                r"graphs: --candidate onnx:int8:"):
        ForeignOnnxBackend(int8, nemo_path=tiny_nemo)

    both = copy_dir(source, tmp_path / "both")
    set_metadata(both / "encoder.int8.onnx", window_size=17)
    with pytest.raises(ArtifactContradiction, match=r"encoder\.int8\.onnx: window_size = 17 contradicts the "
                                                    r"\.nemo's chunk_size \+ pre_encode_cache_size at \[70, 13\] = 121"):
        ForeignOnnxBackend(both, nemo_path=tiny_nemo)
    (both / "joiner.int8.onnx").unlink()
    with pytest.raises(MissingGraphError, match="encoder.int8.onnx, decoder.int8.onnx without joiner.int8.onnx"):
        ForeignOnnxBackend(both, nemo_path=tiny_nemo)


def test_nemotron_script_layout_with_tokens_one_level_up(peer_dirs, tiny_nemo, tmp_path):
    """The Nemotron script writes tokens.txt once and moves each lookahead's graphs into <ms>/."""
    root = copy_dir(peer_dirs["sherpa-onnx"], tmp_path / "nemotron")
    lookaheads = sorted(p for p in root.iterdir() if p.is_dir())
    shutil.move(lookaheads[0] / "tokens.txt", root / "tokens.txt")
    for directory in lookaheads[1:]:
        (directory / "tokens.txt").unlink()
    assert detect(root) == SHERPA_ONNX and detect(lookaheads[0]) == SHERPA_ONNX
    backend = ForeignOnnxBackend(root, nemo_path=tiny_nemo)
    try:
        assert set(backend.artifact.contexts) == set(CONTEXTS)
    finally:
        backend.close()
    (root / "tokens.txt").unlink()
    assert detect(root) is None


@pytest.mark.parametrize("spelling", ["None", "", "NA", None])
def test_each_spelling_of_no_normalisation_is_read(peer_dirs, tiny_nemo, tmp_path, spelling):
    """"" and "NA" (the newer scripts, the runtime's own mapping), "None" (the first FastConformer script)
    and an absent key (the runtime reads it as "") all state what the .nemo's "NA" means."""
    directory = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "normalize")
    if spelling is None:
        set_metadata(directory / "encoder.onnx", drop=("normalize_type",))
    else:
        set_metadata(directory / "encoder.onnx", normalize_type=spelling)
    backend = ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    try:
        assert backend.artifact.contexts == ((70, 13),)
    finally:
        backend.close()
    set_metadata(directory / "encoder.onnx", normalize_type="per_feature")
    with pytest.raises(ArtifactContradiction, match="normalize_type = 'per_feature' contradicts"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)


@pytest.mark.parametrize("key", ["window_size", "chunk_shift", "vocab_size", "subsampling_factor", "pred_hidden",
                                 "cache_last_channel_dim2", "cache_last_time_dim3"])
def test_a_key_the_runtime_reads_cannot_be_missing(peer_dirs, tiny_nemo, tmp_path, key):
    from streaming_parity.backends.onnx.foreign_read import ForeignArtifactError

    directory = copy_dir(_lookahead(peer_dirs, "sherpa-onnx"), tmp_path / "missing")
    set_metadata(directory / "encoder.onnx", drop=(key, "chunk_size_ms", "feat_dim"))
    with pytest.raises(ForeignArtifactError, match=f"encoder.onnx: metadata key '{key}' missing"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
    set_metadata(directory / "encoder.onnx", **{key: ""})  # sherpa-onnx reads an empty value as absent
    with pytest.raises(ForeignArtifactError, match=f"encoder.onnx: metadata key '{key}' missing"):
        ForeignOnnxBackend(directory, nemo_path=tiny_nemo)
